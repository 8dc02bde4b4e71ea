"""Drives the AWS emulator for tests/aws_ec2_events.rs with boto3 (not respawn's code).

    eventbridge_to_sqs.py ENDPOINT QUEUE EVENT_FILE [EVENT_FILE ...]

Makes QUEUE and an EventBridge rule sending every `aws.ec2` event to it, puts each
event file's event with PutEvents (as the test harness injects spot interruptions),
then prints the body of every message the queue receives, one JSON string a line,
until one per event has come (or 30 s pass).
"""

import json
import sys
import time

import boto3

endpoint, queue, files = sys.argv[1], sys.argv[2], sys.argv[3:]
kw = dict(
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)
sqs = boto3.client("sqs", **kw)
events = boto3.client("events", **kw)

url = sqs.create_queue(QueueName=queue)["QueueUrl"]
arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
events.put_rule(Name=f"{queue}-ec2", EventPattern=json.dumps({"source": ["aws.ec2"]}))
events.put_targets(Rule=f"{queue}-ec2", Targets=[{"Id": "queue", "Arn": arn}])
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

seen = 0
deadline = time.time() + 30
while seen < len(files) and time.time() < deadline:
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
    for m in got.get("Messages", []):
        print(json.dumps(m["Body"]), flush=True)
        sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        seen += 1
if seen < len(files):
    sys.exit(f"only {seen} of {len(files)} events arrived")
