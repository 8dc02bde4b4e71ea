"""Drives the AWS emulator for tests/aws_s3_events.rs with boto3 (not respawn's code).

    s3_notifications.py ENDPOINT BUCKET QUEUE KEY [KEY ...]

Makes BUCKET and QUEUE, has BUCKET notify QUEUE of every created object, uploads
each KEY (its body is the key itself), then prints the body of every message the
queue receives, one JSON string a line, until the test event and one message per
key have come (or 30 s pass).
"""

import json
import sys
import time

import boto3

endpoint, bucket, queue, keys = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
kw = dict(
    endpoint_url=endpoint,
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)
s3 = boto3.client("s3", **kw)
sqs = boto3.client("sqs", **kw)

s3.create_bucket(Bucket=bucket)
url = sqs.create_queue(QueueName=queue)["QueueUrl"]
arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
s3.put_bucket_notification_configuration(
    Bucket=bucket,
    NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]
    },
)
for key in keys:
    s3.put_object(Bucket=bucket, Key=key, Body=key.encode())

wanted, seen = len(keys) + 1, 0
deadline = time.time() + 30
while seen < wanted and time.time() < deadline:
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
    for m in got.get("Messages", []):
        print(json.dumps(m["Body"]), flush=True)
        sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
        seen += 1
if seen < wanted:
    sys.exit(f"only {seen} of {wanted} notifications arrived")
