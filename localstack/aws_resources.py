"""The resources of one respawn stack on the local AWS emulator (see aws-resources)."""
# Keep in step with infra/aws/template.yaml.

import json
import sys

import boto3

endpoint, stack = sys.argv[1], sys.argv[2]


def client(service):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


s3, sqs, events = client("s3"), client("sqs"), client("events")


def queue(name):
    """The queue and its dead-letter queue, with the redrive policy respawn's SQS
    adapter gives its own (moved after 8 receives)."""
    logical, band = name.rsplit("-", 1)
    dead_url = sqs.create_queue(QueueName=f"{logical}_dead-{band}")["QueueUrl"]
    dead_arn = sqs.get_queue_attributes(QueueUrl=dead_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "MessageRetentionPeriod": "1209600",
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dead_arn, "maxReceiveCount": 8}),
        },
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    return url, arn


for bucket in (f"{stack}-state", f"{stack}-data"):
    s3.create_bucket(Bucket=bucket)

# The broker's queues, a band per priority (high, normal, low), read highest first.
for logical in ("submit", "dispatch", "events", "notify"):
    for band in ("hi", "no", "lo"):
        queue(f"{stack}-{logical}-{band}")

_, uploads = queue(f"{stack}-uploads-no")
s3.put_bucket_notification_configuration(
    Bucket=f"{stack}-data",
    NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": uploads, "Events": ["s3:ObjectCreated:*"]}]
    },
)

_, ec2_events = queue(f"{stack}-ec2-no")
rule = f"{stack}-ec2-spot"
events.put_rule(
    Name=rule,
    EventPattern=json.dumps(
        {
            "source": ["aws.ec2"],
            "detail-type": [
                "EC2 Spot Instance Interruption Warning",
                "EC2 Instance Rebalance Recommendation",
                "EC2 Instance State-change Notification",
            ],
        }
    ),
)
events.put_targets(Rule=rule, Targets=[{"Id": "ec2-events", "Arn": ec2_events}])
print(f"{stack}: buckets {stack}-state, {stack}-data; queues {stack}-uploads-no, {stack}-ec2-no")
