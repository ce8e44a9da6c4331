"""W1: the seed-style no-op worker. Returns every input unchanged.

    cd example && wkr-serving-start noop_worker.Worker -port 5555 -port_out 5556
"""

from wkr_serving.server import WKRHardWorker


class Worker(WKRHardWorker):
    def get_env(self, device_id, tmp_dir):
        return []

    def get_model(self, envs, model_dir, model_name, tmp_dir):
        self.logger = self.new_logger()
        self.logger.info("noop model on device %s", device_id_name(self.device_id))
        return None

    def predict(self, model, input):
        return input


def device_id_name(device_id):
    return "cpu" if device_id < 0 else f"gpu:{device_id}"
