#!/usr/bin/env python3
"""Third-party counterpart for the interoperability tests (tests/interop.rs):
confluent-kafka produces feature events, fastavro encodes and decodes Avro.

  interop.py produce BOOTSTRAP TOPIC N FORMAT   # FORMAT: avro-raw | json
  interop.py decode prediction|signal           # hex datums on stdin -> JSON lines
  interop.py drive BOOTSTRAP FORMAT SAMPLES N    # the worker end to end, see drive()

Event i: event_id "py-<i>", model "diabetes_lgbm", symbol "SYM<i % 7>",
event_time 1764000000000 + i, features f0..f3 = i * 0.5 + j, with f2
absent when i % 5 == 0.
"""
import datetime
import io
import json
import sys
from pathlib import Path

import fastavro

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


def schema(name):
    return fastavro.parse_schema(json.loads((SCHEMAS / f"{name}_event.avsc").read_text()))


def event(i):
    features = {f"f{j}": i * 0.5 + j for j in range(4) if not (j == 2 and i % 5 == 0)}
    return {"event_id": f"py-{i}", "model": "diabetes_lgbm", "symbol": f"SYM{i % 7}",
            "event_time": 1764000000000 + i, "features": features}


def produce(bootstrap, topic, n, fmt):
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    s = schema("feature")
    errors = []
    for i in range(n):
        e = event(i)
        if fmt == "avro-raw":
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, s, e)
            value = buf.getvalue()
        elif fmt == "json":
            value = json.dumps(e).encode()
        else:
            sys.exit(f"unknown format {fmt}")
        p.produce(topic, value=value, key=e["symbol"].encode(),
                  on_delivery=lambda err, msg: errors.append(err) if err else None)
        p.poll(0)
    left = p.flush(30)
    if left or errors:
        sys.exit(f"{left} undelivered, errors: {errors[:3]}")
    print(f"produced {n}")


def millis(value):
    """fastavro reads timestamp-millis as an aware datetime; back to epoch ms, exactly."""
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    return (value - epoch) // datetime.timedelta(milliseconds=1)


def decode(kind):
    s = schema(kind)
    for line in sys.stdin:
        line = line.strip()
        if line:
            print(json.dumps(fastavro.schemaless_reader(io.BytesIO(bytes.fromhex(line)), s, None), default=millis))


def drive(bootstrap, fmt, samples_dir, n):
    """A Python client drives a running ml-worker: produce N feature events
    (rows of models/samples/*.csv, models round-robin) to `features`, read
    `predictions` and `signals` back, and compare every prediction with the
    reference library's value stored next to its row. Prints a JSON report;
    exits non-zero on any difference, loss or duplicate."""
    import csv
    import time
    from confluent_kafka import Consumer, Producer

    models = []
    for path in sorted(Path(samples_dir).glob("*.csv")):
        with open(path) as f:
            rows = list(csv.reader(f))
        head, body = rows[0], rows[1:]
        k = head.index("prediction")
        models.append((path.stem, head[:k], [[float(x) for x in r] for r in body], k))
    tol = {"diabetes_lgbm": 1e-9, "breast_cancer_xgb": 1e-6}
    expected = {}
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    s = schema("feature")
    now = int(time.time() * 1000)
    for i in range(n):
        name, feats, rows, k = models[i % len(models)]
        row = rows[(i // len(models)) % len(rows)]
        e = {"event_id": f"drive-{i}", "model": name, "symbol": f"SYM{i % 5}", "event_time": now + i,
             "features": dict(zip(feats, row[:k]))}
        expected[e["event_id"]] = (name, row[k], row[k + 1:])
        if fmt == "avro-raw":
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, s, e)
            value = buf.getvalue()
        else:
            value = json.dumps(e).encode()
        p.produce("features", value=value, key=e["symbol"].encode())
        p.poll(0)
    if p.flush(30):
        sys.exit("features not delivered")

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"drive-reader-{now}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe(["predictions", "signals"])
    pred_schema, sig_schema = schema("prediction"), schema("signal")
    predictions, signals, duplicates, problems = {}, {}, 0, []
    deadline = time.time() + 60
    while (len(predictions) < n or len(signals) < n) and time.time() < deadline:
        m = c.poll(0.2)
        if m is None or m.error():
            continue
        is_pred = m.topic() == "predictions"
        if fmt == "avro-raw":
            v = fastavro.schemaless_reader(io.BytesIO(m.value()), pred_schema if is_pred else sig_schema, None)
        else:
            v = json.loads(m.value())
        target = predictions if is_pred else signals
        if v["event_id"] in target:
            duplicates += 1
        target[v["event_id"]] = v
        if m.key().decode() != v["symbol"]:
            problems.append(f"{v['event_id']}: key {m.key()!r} is not the symbol")
    c.close()
    for eid, (name, pred, probs) in expected.items():
        got = predictions.get(eid)
        if got is None:
            problems.append(f"{eid}: no prediction")
            continue
        t = tol.get(name, 1e-5)
        if got["model"] != name or abs(got["prediction"] - pred) > t * max(1.0, abs(pred)):
            problems.append(f"{eid}: {got['model']} predicted {got['prediction']}, reference {pred}")
        if probs and any(abs(a - b) > t for a, b in zip(got["probabilities"] or [], probs)):
            problems.append(f"{eid}: probabilities {got['probabilities']} vs {probs}")
        sig = signals.get(eid)
        if sig is None or sig["side"] not in ("BUY", "SELL", "HOLD") or sig["prediction"] != got["prediction"]:
            problems.append(f"{eid}: signal {sig}")
    report = {"predictions": len(predictions), "signals": len(signals), "duplicates": duplicates,
              "problems": problems[:10], "n_problems": len(problems)}
    print(json.dumps(report))
    if problems or duplicates:
        sys.exit(1)


if __name__ == "__main__":
    if sys.argv[1] == "produce":
        produce(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "decode":
        decode(sys.argv[2])
    elif sys.argv[1] == "drive":
        drive(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(__doc__)
