"""Drives the AWS emulator for tests/aws_ec2_events.rs with boto3 (not respawn's code).

    eventbridge_to_sqs.py ENDPOINT QUEUE EVENT_FILE [EVENT_FILE ...]

Makes QUEUE and an EventBridge rule sending every `aws.ec2` event to it, puts each
event file's event with PutEvents (as the test harness injects spot interruptions),
then prints the body of every message the queue receives, one JSON string a line,
until one per event has come (or 30 s pass).
"""

import json
import sys

from emulator import client, drain, queue

endpoint, name, files = sys.argv[1], sys.argv[2], sys.argv[3:]
sqs = client("sqs", endpoint)
events = client("events", endpoint)

url, arn = queue(sqs, name)
events.put_rule(Name=f"{name}-ec2", EventPattern=json.dumps({"source": ["aws.ec2"]}))
events.put_targets(Rule=f"{name}-ec2", Targets=[{"Id": "queue", "Arn": arn}])
for path in files:
    with open(path) as f:
        e = json.load(f)
    out = events.put_events(
        Entries=[
            {
                "Source": e["source"],
                "DetailType": e["detail-type"],
                "Detail": json.dumps(e["detail"]),
                "Resources": e.get("resources", []),
            }
        ]
    )
    if out.get("FailedEntryCount"):
        sys.exit(f"PutEvents refused {path}: {out}")

seen = drain(sqs, url, len(files))
if seen < len(files):
    sys.exit(f"only {seen} of {len(files)} events arrived")
