"""Call the iris server from Python: classify a few flowers, then evaluate the model on
the held-out file that train.py wrote.

    python example/iris/client.py -port 5555 -port_out 5556 -eval models/eval.csv
"""

from __future__ import annotations

import argparse

from wkr_serving.client import WKRClient
from wkr_serving.client.evalfile import read_table

#: (what it is, its sepal length, sepal width, petal length, petal width in cm)
FLOWERS = [
    ("a setosa", [5.1, 3.5, 1.4, 0.2]),
    ("a versicolor", [6.4, 3.2, 4.5, 1.5]),
    ("a virginica", [6.7, 3.0, 5.2, 2.3]),
    ("no flower seen yet", [9.0, 1.0, 9.0, 0.1]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-ip", default="127.0.0.1", help="the server's address")
    parser.add_argument("-port", type=int, default=5555, help="the server's -port")
    parser.add_argument("-port_out", type=int, default=5556, help="the server's -port_out")
    parser.add_argument("-eval", default="models/eval.csv",
                        help="the evaluation file (CSV with a species column)")
    args = parser.parse_args()

    with WKRClient(args.ip, args.port, args.port_out, protocol="obj",
                   timeout=30_000) as client:
        labels = client.metadata()["metadata"]["labels"]
        names = {int(k): v for k, v in labels.items()}
        for what, flower in FLOWERS:
            result = client.encode(flower)
            probabilities = result["prediction"]
            best = max(range(len(probabilities)), key=probabilities.__getitem__)
            print(f"{what} {flower}: {names[best]} (p={probabilities[best]:.3f}), "
                  f"outlier score {result['outlier_score']:.3f}"
                  f"{' OUTLIER' if result['is_outlier'] else ''}")

        inputs, species = read_table(args.eval, "species")
        metrics = client.evaluate(inputs, species)
        print(f"evaluation on {metrics['num']} flowers of {args.eval}: accuracy "
              f"{metrics['accuracy']:.3f}, macro precision {metrics['precision']:.3f}, "
              f"recall {metrics['recall']:.3f}, F1 {metrics['f1']:.3f}")
        print("confusion matrix (rows: true class, columns: predicted), classes",
              metrics["classes"])
        for row in metrics["confusion_matrix"]:
            print("   ", row)


if __name__ == "__main__":
    main()
