#!/usr/bin/env python3
"""Third-party counterpart for the interoperability tests (tests/interop.rs):
confluent-kafka produces feature events, fastavro encodes and decodes Avro.

  interop.py produce BOOTSTRAP TOPIC N FORMAT   # FORMAT: avro-raw | json
  interop.py decode prediction|signal           # hex datums on stdin -> JSON lines

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


if __name__ == "__main__":
    if sys.argv[1] == "produce":
        produce(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "decode":
        decode(sys.argv[2])
    else:
        sys.exit(__doc__)
