"""W1: the seed-style no-op worker. Returns every input unchanged.

    wkr-serving-start example/noop_worker.Worker -port 5555 -port_out 5556
"""

from wkr_serving.server import WKRHardWorker


class Worker(WKRHardWorker):
    def get_env(self, device_id, tmp_dir):
        # Import frameworks here, not at module level: this runs in the worker process,
        # after CUDA_VISIBLE_DEVICES was pinned to this worker's device.
        return []

    def get_model(self, envs, model_dir, model_name, tmp_dir):
        logger = self.new_logger()
        logger.info("no-op model ready on %s", "cpu" if self.device_id < 0 else
                    f"gpu:{self.device_id}")
        return None

    def predict(self, model, input):
        return input
