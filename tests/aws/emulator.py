"""boto3 clients for the local AWS emulator, shared by the drivers in this folder."""

import boto3


def client(service, endpoint):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def queue(sqs, name):
    """Makes the queue; returns its URL and ARN."""
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return url, arn


def drain(sqs, url, wanted, seconds=30):
    """Prints each message body as a JSON string a line, deleting it, until `wanted`
    have come or `seconds` pass; returns how many came."""
    import json
    import time

    seen, deadline = 0, time.time() + seconds
    while seen < wanted and time.time() < deadline:
        got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for m in got.get("Messages", []):
            print(json.dumps(m["Body"]), flush=True)
            sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
            seen += 1
    return seen
