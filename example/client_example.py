"""Call a running server: one input, a pipelined burst, and the server's status.

    python example/client_example.py -port 5555 -port_out 5556 -protocol obj
"""

import argparse

import numpy as np

from wkr_serving.client import WKRClient


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("-ip", default="127.0.0.1")
    parser.add_argument("-port", type=int, default=5555)
    parser.add_argument("-port_out", type=int, default=5556)
    parser.add_argument("-protocol", default="obj", choices=["obj", "numpy"])
    args = parser.parse_args()

    with WKRClient(args.ip, args.port, args.port_out, protocol=args.protocol,
                   timeout=10_000) as client:
        x = np.arange(4, dtype=np.float32)
        print("one request:", client.encode(x))

        for i in range(100):
            client.encode(x + i, blocking=False)
        results = client.fetch_all()
        print(f"pipelined: {len(results)} results, last = {results[-1]}")

        status = client.server_status
        print("server:", status["server_version"], "protocol", status["protocol"],
              "| requests", status["num_requests"], "| p50 ms",
              round(status["latency_ms"]["p50"], 3),
              "| mean batch", round(status["batch_size"]["mean"], 2))


if __name__ == "__main__":
    main()
