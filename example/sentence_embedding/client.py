"""Embed sentences with the served all-MiniLM-L6-v2 and compare them.

    python example/sentence_embedding/client.py -port 5555 -port_out 5556 \\
        "A man is eating food." "Someone is having a meal." "The stock market fell."

Prints each embedding's size and length, then the cosine similarity of every pair (the
embeddings have unit length, so it is their dot product).
"""

from __future__ import annotations

import argparse

import numpy as np
from wkr_serving.client import WKRClient

DEFAULT_SENTENCES = ["A man is eating food.", "Someone is having a meal.",
                     "The stock market fell sharply today."]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-ip", default="127.0.0.1")
    parser.add_argument("-port", type=int, default=5555)
    parser.add_argument("-port_out", type=int, default=5556)
    parser.add_argument("sentences", nargs="*", default=DEFAULT_SENTENCES)
    args = parser.parse_args(argv)

    with WKRClient(args.ip, args.port, args.port_out, protocol="obj",
                   timeout=10_000) as client:
        one = client.encode(args.sentences[0])  # one sentence per request...
        print(f"{args.sentences[0]!r}: {one.dtype} {one.shape}, "
              f"length {np.linalg.norm(one):.4f}, first numbers "
              f"{[round(float(v), 4) for v in one[:4]]}")
        vectors = np.stack(client.encode_batch(args.sentences))  # ...or several in one
        similarity = vectors @ vectors.T
        for i, a in enumerate(args.sentences):
            for j in range(i + 1, len(args.sentences)):
                print(f"cosine {similarity[i, j]:+.3f}  {a!r} ~ {args.sentences[j]!r}")


if __name__ == "__main__":
    main()
