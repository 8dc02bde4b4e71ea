"""Drives the AWS emulator for tests/aws_s3_events.rs with boto3 (not respawn's code).

    s3_notifications.py ENDPOINT BUCKET QUEUE KEY [KEY ...]

Makes BUCKET and QUEUE, has BUCKET notify QUEUE of every created object, uploads
each KEY (its body is the key itself), then prints the body of every message the
queue receives, one JSON string a line, until the test event and one message per
key have come (or 30 s pass).
"""

import sys

from emulator import client, drain, queue

endpoint, bucket, name, keys = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
s3 = client("s3", endpoint)
sqs = client("sqs", endpoint)

s3.create_bucket(Bucket=bucket)
url, arn = queue(sqs, name)
s3.put_bucket_notification_configuration(
    Bucket=bucket,
    NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]
    },
)
for key in keys:
    s3.put_object(Bucket=bucket, Key=key, Body=key.encode())

wanted = len(keys) + 1
seen = drain(sqs, url, wanted)
if seen < wanted:
    sys.exit(f"only {seen} of {wanted} notifications arrived")
