#!/usr/bin/env python3
"""Writes infra/aws/template.json, the AWS SAM template of a respawn stack.

    python3 infra/aws/template.py          # rewrite template.json
    python3 infra/aws/template.py --check  # fail when template.json is stale

Generated, because a stack has 28 queues (four broker queues in three priority
bands, each with its dead-letter queue, plus the upload and EC2 event queues) and a
least-privilege role per function; the names here are the ones the functions
derive (respawn-host's `lambda` module): queues `<stack>-<queue>-<hi|no|lo>`, dead
letters `<stack>-<queue>_dead-<band>`.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
BANDS = ["hi", "no", "lo"]
BROKER_QUEUES = ["submit", "dispatch", "events", "notify"]
# Receives past respawn's own limit (5) before SQS's redrive moves a message that a
# dying consumer could not (respawn's SQS adapter: max_deliveries + 3).
MAX_RECEIVE = 8
FUNCTION_TIMEOUT = 60


def sub(s):
    return {"Fn::Sub": s}


def ref(name):
    return {"Ref": name}


def camel(name):
    return "".join(p.capitalize() for p in name.replace("_", "-").split("-"))


def queue_id(logical, band, dead=False):
    return f"{camel(logical)}{'Dead' if dead else ''}{camel(band)}Queue"


def queue_name(logical, band, dead=False):
    return sub(f"${{AWS::StackName}}-{logical}{'_dead' if dead else ''}-{band}")


def queue_arn(logical, band, dead=False):
    return {"Fn::GetAtt": [queue_id(logical, band, dead), "Arn"]}


SSE_SQS = {
    "checkov": {
        "skip": [
            {
                "id": "CKV_AWS_27",
                "comment": "encrypted at rest with SQS-managed keys (SqsManagedSseEnabled); a KMS key would need S3 and EventBridge in its key policy",
            }
        ]
    }
}


def queues(resources):
    pairs = [(q, b) for q in BROKER_QUEUES for b in BANDS] + [("uploads", "no"), ("ec2", "no")]
    for logical, band in pairs:
        resources[queue_id(logical, band, True)] = {
            "Type": "AWS::SQS::Queue",
            "Metadata": SSE_SQS,
            "Properties": {
                "QueueName": queue_name(logical, band, True),
                "MessageRetentionPeriod": 1209600,
                "SqsManagedSseEnabled": True,
            },
        }
        resources[queue_id(logical, band)] = {
            "Type": "AWS::SQS::Queue",
            "Metadata": SSE_SQS,
            "Properties": {
                "QueueName": queue_name(logical, band),
                # A job may wait days for capacity.
                "MessageRetentionPeriod": 1209600,
                # Six times the function timeout, as AWS advises for event sources.
                "VisibilityTimeout": 6 * FUNCTION_TIMEOUT,
                "SqsManagedSseEnabled": True,
                "RedrivePolicy": {
                    "deadLetterTargetArn": queue_arn(logical, band, True),
                    "maxReceiveCount": MAX_RECEIVE,
                },
            },
        }
    return pairs


def bucket(name_suffix, extra=None):
    props = {
        "BucketName": sub(f"${{AWS::StackName}}-{name_suffix}-${{AWS::AccountId}}-${{AWS::Region}}"),
        "BucketEncryption": {
            "ServerSideEncryptionConfiguration": [
                {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
            ]
        },
        "PublicAccessBlockConfiguration": {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        },
        "OwnershipControls": {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
        "VersioningConfiguration": {"Status": "Enabled"},
        "LoggingConfiguration": {
            "DestinationBucketName": ref("LogsBucket"),
            "LogFilePrefix": f"{name_suffix}/",
        },
    }
    props.update(extra or {})
    return {"Type": "AWS::S3::Bucket", "Properties": props}


def tls_only(bucket_id):
    return {
        "Type": "AWS::S3::BucketPolicy",
        "Properties": {
            "Bucket": ref(bucket_id),
            "PolicyDocument": {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Sid": "TlsOnly",
                        "Effect": "Deny",
                        "Principal": "*",
                        "Action": "s3:*",
                        "Resource": [
                            {"Fn::GetAtt": [bucket_id, "Arn"]},
                            sub(f"${{{bucket_id}.Arn}}/*"),
                        ],
                        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
                    }
                ],
            },
        },
    }


def statement(actions, resources, condition=None):
    s = {"Effect": "Allow", "Action": actions, "Resource": resources}
    if condition:
        s["Condition"] = condition
    return s


STATE_RW = statement(
    ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"],
    [{"Fn::GetAtt": ["StateBucket", "Arn"]}, sub("${StateBucket.Arn}/*")],
)
DATA_JOBS_RW = statement(
    ["s3:GetObject", "s3:PutObject", "s3:ListBucket"],
    [{"Fn::GetAtt": ["DataBucket", "Arn"]}, sub("${DataBucket.Arn}/*")],
)
SEND = statement(["sqs:SendMessage", "sqs:GetQueueUrl", "sqs:GetQueueAttributes"], [
    sub("arn:${AWS::Partition}:sqs:${AWS::Region}:${AWS::AccountId}:${AWS::StackName}-*")
])
DESCRIBE = statement(["ec2:DescribeInstances"], "*")
TERMINATE = statement(
    ["ec2:TerminateInstances"],
    sub("arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:instance/*"),
    {"StringEquals": {"aws:ResourceTag/respawn:stack": sub("${AWS::StackName}")}},
)
RUN = [
    statement(
        ["ec2:RunInstances", "ec2:CreateTags"],
        [
            sub("arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:instance/*"),
            sub("arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:volume/*"),
        ],
        {"StringEquals": {"aws:RequestTag/respawn:stack": sub("${AWS::StackName}")}},
    ),
    statement(
        ["ec2:RunInstances"],
        [
            sub("arn:${AWS::Partition}:ec2:${AWS::Region}::image/*"),
            sub("arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:subnet/*"),
            sub("arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:network-interface/*"),
            sub("arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:security-group/*"),
            sub("arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:launch-template/${AgentLaunchTemplate}"),
            sub("arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:placement-group/${AgentPlacementGroup}"),
        ],
    ),
    statement(["iam:PassRole"], {"Fn::GetAtt": ["AgentRole", "Arn"]}),
]

# A multi-node attempt's nodes get a security group of the gang's own, admitting
# its members alone; the reconcile timer deletes it once the gang is over.
GANG_GROUPS = [
    statement(["ec2:CreateSecurityGroup"], sub("arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:vpc/*")),
    statement(
        ["ec2:CreateSecurityGroup", "ec2:CreateTags"],
        sub("arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:security-group/*"),
        {"StringEquals": {"aws:RequestTag/respawn:stack": sub("${AWS::StackName}")}},
    ),
    statement(
        [
            "ec2:AuthorizeSecurityGroupIngress",
            "ec2:AuthorizeSecurityGroupEgress",
            "ec2:RevokeSecurityGroupEgress",
            "ec2:DeleteSecurityGroup",
        ],
        sub("arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:security-group/*"),
        {"StringEquals": {"aws:ResourceTag/respawn:stack": sub("${AWS::StackName}")}},
    ),
    statement(["ec2:DescribeSecurityGroups"], "*"),
]

# The agents' security groups: the operator's, or the stack's own.
AGENT_GROUPS = {"Fn::If": ["HasSecurityGroups", ref("SecurityGroupIds"), [ref("AgentSecurityGroup")]]}

# What each function does, with what, fed by which queues.
FUNCTIONS = {
    "submit": {
        "doc": "submission messages become jobs",
        "queues": [("submit", b) for b in BANDS],
        "policy": [STATE_RW, SEND, DESCRIBE, TERMINATE],
    },
    "dispatch": {
        "doc": "attempts get their spot instance",
        "queues": [("dispatch", b) for b in BANDS],
        "policy": [STATE_RW, DATA_JOBS_RW, SEND, DESCRIBE, TERMINATE] + RUN + GANG_GROUPS,
    },
    "events": {
        "doc": "agents' reports and EC2 spot events",
        "queues": [("events", b) for b in BANDS] + [("ec2", "no")],
        "policy": [STATE_RW, SEND, DESCRIBE, TERMINATE],
    },
    "notify": {
        "doc": "state changes POSTed to jobs' URLs, replies to submitters",
        "queues": [("notify", b) for b in BANDS],
        "policy": [STATE_RW, SEND],
    },
    "on-upload": {
        "doc": "uploads make jobs by trigger rules",
        "queues": [("uploads", "no")],
        "policy": [STATE_RW, SEND, DESCRIBE, TERMINATE],
    },
    "reconcile": {
        "doc": "deadlines, lost VMs and orphans, warm pools' size, every minute",
        "schedule": "rate(1 minute)",
        # RUN: it launches the VMs that keep a pool's minimum warm; it sweeps the
        # groups of gangs that are over.
        "policy": [STATE_RW, SEND, DESCRIBE, TERMINATE] + RUN + GANG_GROUPS,
    },
    "api": {
        "doc": "the HTTP API (function URL; bearer tokens, signed webhooks, agent credentials)",
        "url": True,
        "policy": [STATE_RW, DATA_JOBS_RW, SEND, DESCRIBE, TERMINATE],
    },
}


def function(name, spec, resources):
    fid = f"{camel(name)}Function"
    events = {}
    for logical, band in spec.get("queues", []):
        arn = queue_arn(logical, band)
        events[f"{camel(logical)}{camel(band)}"] = {
            "Type": "SQS",
            "Properties": {
                "Queue": arn,
                "BatchSize": 10,
                "MaximumBatchingWindowInSeconds": 1,
                "FunctionResponseTypes": ["ReportBatchItemFailures"],
            },
        }
        # Receiving is only ever from its own queues.
        spec["policy"] = spec["policy"] + [
            statement(
                ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"],
                arn,
            )
        ]
    if "schedule" in spec:
        events["Schedule"] = {"Type": "Schedule", "Properties": {"Schedule": spec["schedule"]}}
    props = {
        "Description": f"respawn {name}: {spec['doc']}",
        "CodeUri": f"../../target/lambda/respawn-{name}/",
        "Handler": "bootstrap",
        "Policies": [{"Version": "2012-10-17", "Statement": spec["policy"]}],
        "Events": events,
        "ReservedConcurrentExecutions": {"Ref": "Concurrency"},
    }
    if spec.get("url"):
        props["FunctionUrlConfig"] = {"AuthType": "NONE"}
    else:
        props["Environment"] = {"Variables": {"RESPAWN_API_URL": {"Fn::GetAtt": ["ApiFunctionUrl", "FunctionUrl"]}}}
    resources[fid] = {
        "Type": "AWS::Serverless::Function",
        "Metadata": {
            "checkov": {
                "skip": [
                    {"id": "CKV_AWS_116", "comment": "SQS-fed: failures go to each queue's own dead-letter queue, with the reason"},
                    {"id": "CKV_AWS_117", "comment": "talks to AWS APIs and notify URLs over the internet; no VPC resources"},
                    {"id": "CKV_AWS_173", "comment": "no secret in plain environment variables; the broker key is a Secrets Manager dynamic reference"},
                ]
                + (
                    [{"id": "CKV_AWS_258", "comment": "the API authenticates every request itself (bearer tokens, HMAC agent credentials, signed webhooks)"}]
                    if spec.get("url")
                    else []
                )
            }
        },
        "Properties": props,
    }


def template():
    resources = {}
    queues(resources)
    resources["LogsBucket"] = bucket("logs")
    del resources["LogsBucket"]["Properties"]["LoggingConfiguration"]
    resources["LogsBucket"]["Metadata"] = {
        "checkov": {"skip": [{"id": "CKV_AWS_18", "comment": "the access-log bucket itself"}]}
    }
    resources["LogsBucketPolicy"] = tls_only("LogsBucket")
    resources["LogsBucketPolicy"]["Properties"]["PolicyDocument"]["Statement"].append(
        {
            "Sid": "AccessLogs",
            "Effect": "Allow",
            "Principal": {"Service": "logging.s3.amazonaws.com"},
            "Action": "s3:PutObject",
            "Resource": sub("${LogsBucket.Arn}/*"),
            "Condition": {"StringEquals": {"aws:SourceAccount": sub("${AWS::AccountId}")}},
        }
    )
    resources["StateBucket"] = bucket("state")
    resources["StateBucketPolicy"] = tls_only("StateBucket")
    resources["DataBucket"] = bucket(
        "data",
        {
            "NotificationConfiguration": {
                "QueueConfigurations": [
                    {"Event": "s3:ObjectCreated:*", "Queue": queue_arn("uploads", "no")}
                ]
            }
        },
    )
    resources["DataBucket"]["DependsOn"] = ["UploadsQueuePolicy"]
    resources["DataBucketPolicy"] = tls_only("DataBucket")
    resources["UploadsQueuePolicy"] = {
        "Type": "AWS::SQS::QueuePolicy",
        "Properties": {
            "Queues": [ref(queue_id("uploads", "no"))],
            "PolicyDocument": {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "s3.amazonaws.com"},
                        "Action": "sqs:SendMessage",
                        "Resource": queue_arn("uploads", "no"),
                        "Condition": {
                            "ArnLike": {
                                "aws:SourceArn": sub(
                                    "arn:${AWS::Partition}:s3:::${AWS::StackName}-data-${AWS::AccountId}-${AWS::Region}"
                                )
                            },
                            "StringEquals": {"aws:SourceAccount": sub("${AWS::AccountId}")},
                        },
                    }
                ],
            },
        },
    }
    resources["Ec2EventsRule"] = {
        "Type": "AWS::Events::Rule",
        "Properties": {
            "Description": "EC2 spot interruption warnings, rebalance recommendations and state changes to respawn",
            "EventPattern": {
                "source": ["aws.ec2"],
                "detail-type": [
                    "EC2 Spot Instance Interruption Warning",
                    "EC2 Instance Rebalance Recommendation",
                    "EC2 Instance State-change Notification",
                ],
            },
            "Targets": [{"Id": "ec2-events", "Arn": queue_arn("ec2", "no")}],
        },
    }
    resources["Ec2QueuePolicy"] = {
        "Type": "AWS::SQS::QueuePolicy",
        "Properties": {
            "Queues": [ref(queue_id("ec2", "no"))],
            "PolicyDocument": {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "events.amazonaws.com"},
                        "Action": "sqs:SendMessage",
                        "Resource": queue_arn("ec2", "no"),
                        "Condition": {"ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": ["Ec2EventsRule", "Arn"]}}},
                    }
                ],
            },
        },
    }
    resources["BrokerKey"] = {
        "Type": "AWS::SecretsManager::Secret",
        "Metadata": {
            "checkov": {
                "skip": [
                    {"id": "CKV_AWS_149", "comment": "encrypted with the account's default key for Secrets Manager"}
                ]
            }
        },
        "Properties": {
            "Description": "respawn's broker key: agent credentials, queue seals, notification signatures",
            # 64 hex digits: what RESPAWN_KEY expects.
            "GenerateSecretString": {
                "PasswordLength": 64,
                "ExcludeUppercase": True,
                "ExcludePunctuation": True,
                "ExcludeCharacters": "ghijklmnopqrstuvwxyz",
                "IncludeSpace": False,
                "RequireEachIncludedType": False,
            },
        },
    }
    resources["AgentRole"] = {
        "Type": "AWS::IAM::Role",
        "Properties": {
            "Description": "respawn's agents: the job bucket, nothing else",
            "AssumeRolePolicyDocument": {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"Service": "ec2.amazonaws.com"},
                        "Action": "sts:AssumeRole",
                    }
                ],
            },
            "Policies": [
                {
                    "PolicyName": "job-bucket",
                    "PolicyDocument": {"Version": "2012-10-17", "Statement": [DATA_JOBS_RW]},
                }
            ],
        },
    }
    resources["AgentInstanceProfile"] = {
        "Type": "AWS::IAM::InstanceProfile",
        "Properties": {"Roles": [ref("AgentRole")]},
    }
    # What every agent VM shares; the dispatch function adds the image, instance
    # type, spot options, tags and user data of each attempt.
    resources["AgentLaunchTemplate"] = {
        "Type": "AWS::EC2::LaunchTemplate",
        "Properties": {
            "LaunchTemplateData": {
                "IamInstanceProfile": {"Arn": {"Fn::GetAtt": ["AgentInstanceProfile", "Arn"]}},
                # IMDSv2 only, one hop: containers behind a bridge cannot reach it
                # (the user data also keeps it from every user but root).
                "MetadataOptions": {
                    "HttpEndpoint": "enabled",
                    "HttpTokens": "required",
                    "HttpPutResponseHopLimit": 1,
                },
                "BlockDeviceMappings": [
                    {
                        "DeviceName": "/dev/xvda",
                        "Ebs": {"Encrypted": True, "VolumeType": "gp3", "DeleteOnTermination": True},
                    }
                ],
                "InstanceInitiatedShutdownBehavior": "terminate",
                "SecurityGroupIds": AGENT_GROUPS,
            }
        },
    }
    # Without the operator's groups, agents get this one rather than the VPC's
    # default group, which admits every other member: one job's instance must
    # not reach another's.
    resources["AgentSecurityGroup"] = {
        "Type": "AWS::EC2::SecurityGroup",
        "Condition": "NoSecurityGroups",
        "Properties": {
            # Outbound (images, storage, the API): EC2's default rule, all.
            "GroupDescription": "respawn agents: nothing inbound; the nodes of a gang reach each other through a group of the gang",
            "VpcId": {"Fn::If": ["HasVpc", ref("VpcId"), {"Ref": "AWS::NoValue"}]},
            "Tags": [{"Key": "respawn:stack", "Value": sub("${AWS::StackName}")}],
        },
    }
    # Multi-node attempts launch their gang in it, all nodes close together; one
    # for the stack, so that no group is left behind per job.
    resources["AgentPlacementGroup"] = {
        "Type": "AWS::EC2::PlacementGroup",
        "Properties": {"Strategy": "cluster"},
    }
    for name, spec in FUNCTIONS.items():
        function(name, dict(spec), resources)

    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Transform": "AWS::Serverless-2016-10-31",
        "Description": "respawn: spot GPU training jobs that survive preemption, as Lambda functions on SQS, S3 and EC2 Spot",
        "Parameters": {
            "AgentImageId": {
                "Type": "AWS::EC2::Image::Id",
                "Description": "An image with respawn-agent (built with --features aws), bubblewrap and iptables; GPU drivers for GPU jobs",
            },
            "CpuInstanceType": {"Type": "String", "Default": "c6i.large"},
            "InstanceTypes": {
                "Type": "String",
                "Default": "",
                "Description": "GPU instance types as model:gpus=type,… (empty: respawn's built-in table)",
            },
            "SubnetId": {"Type": "String", "Default": "", "Description": "Where agents run (empty: the default VPC)"},
            "VpcId": {"Type": "String", "Default": "", "Description": "SubnetId's VPC (empty: the default VPC)"},
            "SecurityGroupIds": {"Type": "CommaDelimitedList", "Default": ""},
            "Pools": {
                "Type": "String",
                "Default": "",
                "Description": "Warm pools of agent instances, ';'-separated, e.g. cpu:max=4,idle=10m;a10g:gpus=1,max=8 (empty: a fresh instance per attempt)",
            },
            "OtlpEndpoint": {
                "Type": "String",
                "Default": "",
                "Description": "OTLP/HTTP endpoint of a collector for the functions' traces and metrics (OTEL_EXPORTER_OTLP_ENDPOINT; empty: none exported)",
            },
            "AgentOtlpEndpoint": {
                "Type": "String",
                "Default": "",
                "Description": "OTLP/HTTP endpoint the agents on the instances export their spans to, reachable from SubnetId (empty: none exported)",
            },
            "Prices": {
                "Type": "String",
                "Default": "",
                "Description": "Spot and on-demand prices for the saving metric, model=SPOT/ON_DEMAND dollars an hour, comma-separated (e.g. a10g=0.45/1.21,cpu=0.03/0.09)",
            },
            "Concurrency": {
                "Type": "Number",
                "Default": 10,
                "Description": "Reserved concurrency of each function",
            },
        },
        "Rules": {
            "SubnetNeedsItsVpc": {
                "RuleCondition": {"Fn::Not": [{"Fn::Equals": [ref("SubnetId"), ""]}]},
                "Assertions": [{
                    "Assert": {"Fn::Not": [{"Fn::Equals": [ref("VpcId"), ""]}]},
                    "AssertDescription": "with SubnetId, give its VpcId: agents' and gangs' security groups are made there",
                }],
            },
        },
        "Conditions": {
            "HasSubnet": {"Fn::Not": [{"Fn::Equals": [ref("SubnetId"), ""]}]},
            "HasVpc": {"Fn::Not": [{"Fn::Equals": [ref("VpcId"), ""]}]},
            "NoSecurityGroups": {"Fn::Not": [{"Condition": "HasSecurityGroups"}]},
            "HasSecurityGroups": {
                "Fn::Not": [{"Fn::Equals": [{"Fn::Join": [",", ref("SecurityGroupIds")]}, ""]}]
            },
        },
        "Globals": {
            "Function": {
                "Runtime": "provided.al2023",
                "Architectures": ["x86_64"],
                "MemorySize": 256,
                "Timeout": FUNCTION_TIMEOUT,
                "Tracing": "Active",
                "Environment": {
                    "Variables": {
                        "RESPAWN_STACK": sub("${AWS::StackName}"),
                        "RESPAWN_STATE_BUCKET": ref("StateBucket"),
                        "RESPAWN_BUCKET": ref("DataBucket"),
                        "RESPAWN_KEY": sub("{{resolve:secretsmanager:${BrokerKey}:SecretString}}"),
                        "RESPAWN_EC2_IMAGE": ref("AgentImageId"),
                        "RESPAWN_EC2_CPU_TYPE": ref("CpuInstanceType"),
                        "RESPAWN_EC2_INSTANCE_TYPES": ref("InstanceTypes"),
                        "RESPAWN_EC2_SUBNET": {"Fn::If": ["HasSubnet", ref("SubnetId"), {"Ref": "AWS::NoValue"}]},
                        "RESPAWN_EC2_VPC": {"Fn::If": ["HasVpc", ref("VpcId"), {"Ref": "AWS::NoValue"}]},
                        "RESPAWN_EC2_SECURITY_GROUPS": {"Fn::Join": [",", AGENT_GROUPS]},
                        "RESPAWN_EC2_LAUNCH_TEMPLATE": ref("AgentLaunchTemplate"),
                        "RESPAWN_EC2_PLACEMENT_GROUP": ref("AgentPlacementGroup"),
                        "RESPAWN_EC2_POOLS": ref("Pools"),
                        "RESPAWN_PRICES": ref("Prices"),
                        "RESPAWN_AGENT_OTLP_ENDPOINT": ref("AgentOtlpEndpoint"),
                        "OTEL_EXPORTER_OTLP_ENDPOINT": ref("OtlpEndpoint"),
                    }
                },
            }
        },
        "Resources": resources,
        "Outputs": {
            "ApiUrl": {
                "Description": "respawn --endpoint",
                "Value": {"Fn::GetAtt": ["ApiFunctionUrl", "FunctionUrl"]},
            },
            "DataBucket": {"Description": "The job bucket (uploads trigger jobs)", "Value": ref("DataBucket")},
            "StateBucket": {
                "Description": "Records, tokens, secrets; the first admin token is at admin-token",
                "Value": ref("StateBucket"),
            },
        },
    }


def main():
    text = json.dumps(template(), indent=2) + "\n"
    path = HERE / "template.json"
    if "--check" in sys.argv:
        if not path.exists() or path.read_text() != text:
            sys.exit("infra/aws/template.json is stale: run python3 infra/aws/template.py")
        return
    path.write_text(text)


if __name__ == "__main__":
    main()
