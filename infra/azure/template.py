#!/usr/bin/env python3
"""Writes infra/azure/template.json, the ARM template of a respawn stack on Azure.

    python3 infra/azure/template.py          # rewrite template.json
    python3 infra/azure/template.py --check  # fail when template.json is stale

ARM JSON rather than Bicep: Bicep's CLI is a download, this is the standard
library. Generated, because a stack has 26 queues (four broker queues in three
priority bands, each with its poison queue, plus the uploads queue) and a role
assignment per identity and scope. The names are the ones respawn's Storage Queue
adapter derives (crates/adapters/src/azqueue.rs): `<stack>-<queue>-<hi|no|lo>`,
dead letters in `<name>-poison` (Azure Functions' convention).

Before it is written or compared, the template is checked (check() below): every
ARM expression parses; every resourceId(), scope and dependsOn names a resource
defined here; every reference() is to a resource its user depends on, and no
dependency is circular; every parameters() and variables() exists; every name
comes from the parameters; no subscription id, account key or SAS is written in;
the default stack's queue names follow Azure's rules.
"""

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
BANDS = ["hi", "no", "lo"]
BROKER_QUEUES = ["submit", "dispatch", "events", "notify"]
QUEUES = [(q, b) for q in BROKER_QUEUES for b in BANDS] + [("uploads", "no")]
# state: records, tokens, secrets (the broker only); jobs: inputs, checkpoints,
# logs, outputs (broker and agents); deadletters: uploads Event Grid could not
# deliver; deployments: the function package; azure-webjobs-*: the Functions host's.
CONTAINERS = ["state", "jobs", "deadletters", "deployments", "azure-webjobs-hosts", "azure-webjobs-secrets"]
UPLOADS_SUBJECT = "/blobServices/default/containers/jobs/blobs/"

# Built-in role definitions (the same ids in every tenant).
BLOB_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"  # Storage Blob Data Contributor
BLOB_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"  # Storage Blob Data Owner
BLOB_READER = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"  # Storage Blob Data Reader
QUEUE_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"  # Storage Queue Data Contributor
QUEUE_SENDER = "c6a89b2d-59bc-44d0-9896-0f6e12d7b80a"  # Storage Queue Data Message Sender
KV_SECRETS_USER = "4633458b-17de-408a-b874-0445c86b69e6"  # Key Vault Secrets User
IDENTITY_OPERATOR = "f1a07417-d97a-45cb-824c-7a7467783830"  # Managed Identity Operator
METRICS_PUBLISHER = "3913510d-42f4-4e42-8a64-420c390055eb"  # Monitoring Metrics Publisher
BUILTIN_ROLES = {BLOB_CONTRIBUTOR, BLOB_OWNER, BLOB_READER, QUEUE_CONTRIBUTOR, QUEUE_SENDER,
                 KV_SECRETS_USER, IDENTITY_OPERATOR, METRICS_PUBLISHER}

# The custom role with which the broker launches and retires agents: a Spot VM with
# a NIC in the agents' subnet and an image (a gang's in its proximity placement
# group, its nodes' addresses read from their NICs), polling Compute's and Network's
# asynchronous operations. Giving a VM the agent identity is granted on that
# identity alone (Managed Identity Operator), not on every identity in the group.
VM_LAUNCHER_ACTIONS = [
    *(f"Microsoft.Compute/virtualMachines/{a}" for a in ("read", "write", "delete", "instanceView/read")),
    "Microsoft.Compute/disks/read", "Microsoft.Compute/disks/delete",
    "Microsoft.Compute/images/read", "Microsoft.Compute/galleries/images/versions/read",
    "Microsoft.Compute/locations/operations/read",
    # A multi-node attempt's gang goes in a proximity placement group of its own,
    # its NICs in an application security group of its own, which a rule of the
    # gang's in the agents' NSG lets reach each other (and no other VM).
    *(f"Microsoft.Compute/proximityPlacementGroups/{a}" for a in ("read", "write", "delete")),
    *(f"Microsoft.Network/applicationSecurityGroups/{a}"
      for a in ("read", "write", "delete", "joinIpConfiguration/action", "joinNetworkSecurityRule/action")),
    *(f"Microsoft.Network/networkSecurityGroups/securityRules/{a}" for a in ("read", "write", "delete")),
    *(f"Microsoft.Network/networkInterfaces/{a}" for a in ("read", "write", "delete", "join/action")),
    "Microsoft.Network/virtualNetworks/subnets/join/action",
    "Microsoft.Network/networkSecurityGroups/join/action",
    "Microsoft.Network/locations/operations/read",
]

# API versions, by resource provider.
API = {
    "Microsoft.Authorization": "2022-04-01",
    "Microsoft.EventGrid": "2022-06-15",
    "Microsoft.Insights": "2020-02-02",
    "Microsoft.KeyVault": "2023-07-01",
    "Microsoft.ManagedIdentity": "2023-01-31",
    "Microsoft.Network": "2024-01-01",
    "Microsoft.OperationalInsights": "2023-09-01",
    "Microsoft.Storage": "2023-05-01",
    "Microsoft.Web": "2023-12-01",
}


# ARM expressions, built as text: lit() a string literal, P/V a parameter or a
# variable, call() a function; ex() makes one a template string ("[...]").
def lit(s):
    return "'" + s.replace("'", "''") + "'"


def P(name):
    return f"parameters({lit(name)})"


def V(name):
    return f"variables({lit(name)})"


def call(fn, *args):
    return f"{fn}({', '.join(str(a) for a in args)})"


def ex(expr):
    return f"[{expr}]"


class Ref:
    """A resource of this template: its type and name segments (expressions)."""

    def __init__(self, rtype, *names):
        self.type, self.names = rtype, names

    @property
    def id(self):
        return call("resourceId", lit(self.type), *self.names)

    @property
    def name(self):
        parts = [p for n in self.names for p in (lit("/"), n)][1:]
        return parts[0] if len(parts) == 1 else call("concat", *parts)

    @property
    def scope(self):
        """The relative form an extension resource's `scope` takes."""
        namespace, *types = self.type.split("/")
        prefixes = [f"{namespace}/{types[0]}/"] + [f"/{t}/" for t in types[1:]]
        return call("concat", *[p for pre, n in zip(prefixes, self.names) for p in (lit(pre), n)])

    def reference(self, full=False):
        return call("reference", self.id, lit(API[self.type.split("/")[0]]), *([lit("Full")] if full else []))

    def child(self, rtype, *names):
        return Ref(f"{self.type}/{rtype}", *self.names, *names)


STACK = V("stack")
UNIQUE = call("uniqueString", "resourceGroup().id", STACK)
LOCATION = ex(P("location"))
IDENTITY = "Microsoft.ManagedIdentity/userAssignedIdentities"
BROKER = Ref(IDENTITY, V("brokerIdentityName"))
AGENT = Ref(IDENTITY, V("agentIdentityName"))
STORAGE = Ref("Microsoft.Storage/storageAccounts", V("storageName"))
BLOBS = STORAGE.child("blobServices", lit("default"))
QUEUE_SERVICE = STORAGE.child("queueServices", lit("default"))
VAULT = Ref("Microsoft.KeyVault/vaults", V("vaultName"))
SECRET = VAULT.child("secrets", lit("broker-key"))
TOPIC = Ref("Microsoft.EventGrid/systemTopics", V("topicName"))
NSG = Ref("Microsoft.Network/networkSecurityGroups", V("nsgName"))
VNET = Ref("Microsoft.Network/virtualNetworks", V("vnetName"))
SUBNET = VNET.child("subnets", lit("agents"))
WORKSPACE = Ref("Microsoft.OperationalInsights/workspaces", V("workspaceName"))
INSIGHTS = Ref("Microsoft.Insights/components", V("insightsName"))
PLAN = Ref("Microsoft.Web/serverfarms", V("planName"))
SITE = Ref("Microsoft.Web/sites", V("appName"))
VM_LAUNCHER = Ref("Microsoft.Authorization/roleDefinitions", V("vmLauncherRole"))


def container(name):
    return BLOBS.child("containers", lit(name))


def queue_suffix(logical, band, poison=False):
    return f"-{logical}-{band}{'-poison' if poison else ''}"


def queue(logical, band, poison=False):
    return QUEUE_SERVICE.child("queues", call("concat", STACK, lit(queue_suffix(logical, band, poison))))


ORDER = ["type", "apiVersion", "name", "scope", "condition", "location", "kind", "sku", "identity", "metadata",
         "dependsOn", "properties"]


def res(ref, props=None, depends=(), name=None, **extra):
    """A resource: `ref` says its type and name, `depends` holds Refs or names."""
    r = {"type": ref.type, "apiVersion": API[ref.type.split("/")[0]], "name": ex(name or ref.name), **extra}
    if props is not None:
        r["properties"] = props
    if depends:
        r["dependsOn"] = [ex(d.id) if isinstance(d, Ref) else d for d in depends]
    return {k: r[k] for k in sorted(r, key=ORDER.index)}


def skips(*pairs):
    """checkov's suppressions for an ARM resource: 'ID:reason' under metadata.checkov."""
    return {"checkov": [f"{cid}:{why}" for cid, why in pairs]}


def role(key, target, principal, role_def, depends=(), salt=(), **extra):
    """`principal` gets `role_def` (a built-in id, or an expression) on `target`
    (a Ref; None: the resource group). The name is a guid() of the scope, key,
    role and salt."""
    if role_def in BUILTIN_ROLES:
        role_def = call("subscriptionResourceId", lit("Microsoft.Authorization/roleDefinitions"), lit(role_def))
    props = {"roleDefinitionId": ex(role_def), "principalId": ex(principal), "principalType": "ServicePrincipal"}
    name = call("guid", target.id if target else "resourceGroup().id", lit(key), role_def, *salt)
    if target:
        extra["scope"] = ex(target.scope)
    return res(Ref("Microsoft.Authorization/roleAssignments"), props, list(depends) + ([target] if target else []),
               name=name, **extra)


def principal(ref):
    return f"{ref.reference()}.principalId"


def identities(resources):
    """The two identities, the VM launcher role, and what each identity may do.
    Returns the names of the broker's role assignments, which its app waits for."""
    resources += [res(BROKER, location=LOCATION), res(AGENT, location=LOCATION)]
    resources.append(res(VM_LAUNCHER, {
        "roleName": ex(call("concat", lit("respawn VM launcher ("), "resourceGroup().name", lit("/"), STACK, lit(")"))),
        "description": "Create, read and delete respawn's Spot VMs and their NICs in this resource group",
        "type": "CustomRole",
        "permissions": [{"actions": VM_LAUNCHER_ACTIONS, "notActions": []}],
        "assignableScopes": [ex("resourceGroup().id")],
    }))
    broker, agent = principal(BROKER), principal(AGENT)
    launcher = call("subscriptionResourceId", lit(VM_LAUNCHER.type), V("vmLauncherRole"))
    grants = [
        ("broker-state", container("state"), BLOB_CONTRIBUTOR),
        ("broker-jobs", container("jobs"), BLOB_CONTRIBUTOR),
        # The function package, fetched by WEBSITE_RUN_FROM_PACKAGE as the broker.
        ("broker-package", container("deployments"), BLOB_READER),
        # The Functions host's own blobs (locks, timers, keys): Owner, as Functions'
        # documentation asks for AzureWebJobsStorage, but on its two containers only.
        ("broker-host-hosts", container("azure-webjobs-hosts"), BLOB_OWNER),
        ("broker-host-secrets", container("azure-webjobs-secrets"), BLOB_OWNER),
        ("broker-queues", QUEUE_SERVICE, QUEUE_CONTRIBUTOR),
        ("broker-key", SECRET, KV_SECRETS_USER),
        ("broker-assigns-agent", AGENT, IDENTITY_OPERATOR),
        ("broker-telemetry", INSIGHTS, METRICS_PUBLISHER),
        ("broker-launches-vms", None, launcher),
    ]
    names = []
    for key, target, role_def in grants:
        depends = [BROKER] + ([VM_LAUNCHER] if target is None else [])
        resources.append(role(key, target, broker, role_def, depends))
        names.append(resources[-1]["name"])
    resources.append(role("agent-jobs", container("jobs"), agent, BLOB_CONTRIBUTOR, [AGENT]))
    # Whoever uploads the function package, if deployerObjectId names someone.
    deployer = role("deployer-package", container("deployments"), P("deployerObjectId"), BLOB_CONTRIBUTOR,
                    salt=[P("deployerObjectId")], condition=ex(call("not", call("empty", P("deployerObjectId")))))
    del deployer["properties"]["principalType"]  # a person or a pipeline's principal
    resources.append(deployer)
    return names


def storage(resources):
    resources.append(res(
        STORAGE,
        {
            "accessTier": "Hot",
            "allowBlobPublicAccess": False,
            "allowCrossTenantReplication": False,
            # Entra ID only: the broker, the agents, the Functions host and Event
            # Grid all use managed identities.
            "allowSharedKeyAccess": False, "defaultToOAuthAuthentication": True,
            "minimumTlsVersion": "TLS1_2", "supportsHttpsTrafficOnly": True,
            "publicNetworkAccess": "Enabled", "networkAcls": {"bypass": "AzureServices", "defaultAction": "Allow"},
            "encryption": {
                "keySource": "Microsoft.Storage",
                "requireInfrastructureEncryption": ex(P("infrastructureEncryption")),
                "services": {"blob": {"enabled": True, "keyType": "Account"},
                             "file": {"enabled": True, "keyType": "Account"}},
            },
        },
        kind="StorageV2",
        location=LOCATION,
        sku={"name": ex(P("storageSku"))},
        metadata=skips(
            ("CKV_AZURE_43", "the name is made at deployment: the stack name's letters and digits, then uniqueString(), 24 at most"),
            ("CKV_AZURE_35", "Functions on a Consumption plan has no virtual network, so the account takes public traffic; every request needs an Entra ID token (no shared keys, no anonymous access)"),
            ("CKV_AZURE_59", "as CKV_AZURE_35: the Functions host reaches the account over its public endpoint, with Entra ID tokens only"),
            ("CKV_AZURE_206", "checkpoints can be large: zone-redundant by default, geo-redundant through the storageSku parameter"),
        ),
    ))
    days = ex(P("softDeleteDays"))
    resources.append(res(BLOBS, {
        "isVersioningEnabled": True,
        "deleteRetentionPolicy": {"enabled": True, "days": days},
        "containerDeleteRetentionPolicy": {"enabled": True, "days": days},
    }, [STORAGE]))
    # Every write of a job record makes a version: old versions go after a while.
    resources.append(res(STORAGE.child("managementPolicies", lit("default")), {"policy": {"rules": [{
        "name": "expire-old-versions", "enabled": True, "type": "Lifecycle",
        "definition": {
            "filters": {"blobTypes": ["blockBlob"]},
            "actions": {"version": {"delete": {"daysAfterCreationGreaterThan": days}}},
        },
    }]}}, [STORAGE]))
    resources += [res(container(name), {"publicAccess": "None"}, [BLOBS]) for name in CONTAINERS]
    resources.append(res(QUEUE_SERVICE, {}, [STORAGE]))
    for logical, band in QUEUES:
        for poison in (False, True):
            resources.append(res(queue(logical, band, poison), {"metadata": {
                "respawn": f"{logical}{' dead letters' if poison else ''}, band {band}",
            }}, [QUEUE_SERVICE]))


def events(resources):
    """Uploads to the jobs container, as BlobCreated events on the uploads queue."""
    resources.append(res(
        TOPIC, {"source": ex(STORAGE.id), "topicType": "Microsoft.Storage.StorageAccounts"}, [STORAGE],
        location=LOCATION, identity={"type": "SystemAssigned"},
    ))
    topic = f"{TOPIC.reference(full=True)}.identity.principalId"
    uploads = queue("uploads", "no")
    resources += [
        role("topic-sends-uploads", uploads, topic, QUEUE_SENDER, [TOPIC]),
        role("topic-writes-deadletters", container("deadletters"), topic, BLOB_CONTRIBUTOR, [TOPIC]),
    ]
    identity = {"type": "SystemAssigned"}
    resources.append(res(TOPIC.child("eventSubscriptions", lit("uploads")), {
        "eventDeliverySchema": ex(P("eventDeliverySchema")),
        "filter": {"includedEventTypes": ["Microsoft.Storage.BlobCreated"], "subjectBeginsWith": UPLOADS_SUBJECT},
        "deliveryWithResourceIdentity": {"identity": identity, "destination": {
            "endpointType": "StorageQueue",
            "properties": {
                "resourceId": ex(STORAGE.id),
                "queueName": ex(uploads.names[-1]),
                # Never expire: an upload may wait out a broker outage.
                "queueMessageTimeToLiveInSeconds": -1,
            },
        }},
        "deadLetterWithResourceIdentity": {"identity": identity, "deadLetterDestination": {
            "endpointType": "StorageBlob",
            "properties": {"resourceId": ex(STORAGE.id), "blobContainerName": "deadletters"},
        }},
        "retryPolicy": {"maxDeliveryAttempts": 30, "eventTimeToLiveInMinutes": 1440},
    }, [TOPIC, resources[-2]["name"], resources[-1]["name"]]))


def vault(resources):
    resources.append(res(
        VAULT,
        {
            "tenantId": ex("subscription().tenantId"),
            "sku": {"family": "A", "name": "standard"},
            "enableRbacAuthorization": True,
            "enableSoftDelete": True, "softDeleteRetentionInDays": 90, "enablePurgeProtection": True,
            "publicNetworkAccess": "Enabled", "networkAcls": {"bypass": "AzureServices", "defaultAction": "Allow"},
        },
        location=LOCATION,
        metadata=skips(
            ("CKV_AZURE_109", "the Functions host resolves the broker key's Key Vault reference from a Consumption plan, which has no virtual network or fixed addresses to allow; access is by RBAC: one secret, one identity"),
            ("CKV_AZURE_189", "as CKV_AZURE_109: a Consumption plan cannot reach a private endpoint"),
        ),
    ))
    resources.append(res(
        SECRET, {"value": ex(P("brokerKey")), "contentType": "text/plain; hex"}, [VAULT],
        metadata=skips(("CKV_AZURE_41", "the broker key has no fixed lifetime: rotate it by deploying a new brokerKey (Key Vault does not stop reads past an expiry anyway)")),
    ))


def network(resources):
    resources.append(res(NSG, {"securityRules": [{
        # The default rules deny it already; said here so that no allow goes above.
        "name": "deny-internet-inbound",
        "properties": {"priority": 4096, "direction": "Inbound", "access": "Deny", "protocol": "*",
                       "sourceAddressPrefix": "Internet", "sourcePortRange": "*",
                       "destinationAddressPrefix": "*", "destinationPortRange": "*"},
    }, {
        # One job's VM must not reach another's (the default AllowVnetInBound
        # would let it): agents take no connections, except a multi-node
        # attempt's nodes from each other, through the rule (priority 1000-3999)
        # and application security group the broker makes for each gang.
        "name": "deny-vnet-inbound",
        "properties": {"priority": 4095, "direction": "Inbound", "access": "Deny", "protocol": "*",
                       "sourceAddressPrefix": "VirtualNetwork", "sourcePortRange": "*",
                       "destinationAddressPrefix": "*", "destinationPortRange": "*"},
    }]}, location=LOCATION))
    resources.append(res(VNET, {
        "addressSpace": {"addressPrefixes": [ex(P("vnetAddressPrefix"))]},
        "subnets": [{"name": "agents", "properties": {
            "addressPrefix": ex(P("agentsSubnetPrefix")),
            "networkSecurityGroup": {"id": ex(NSG.id)},
            # Agents have no public address; they reach storage, the API and their
            # images outbound (a NAT gateway on the subnet gives them fixed ones).
            "defaultOutboundAccess": True,
        }}],
    }, [NSG], location=LOCATION))


def function_app(resources, broker_roles):
    resources.append(res(WORKSPACE, {"sku": {"name": "PerGB2018"}, "retentionInDays": 30}, location=LOCATION))
    resources.append(res(
        INSIGHTS, {"Application_Type": "web", "WorkspaceResourceId": ex(WORKSPACE.id), "DisableLocalAuth": True},
        [WORKSPACE], kind="web", location=LOCATION,
    ))
    resources.append(res(
        PLAN, {"reserved": True}, kind="functionapp", location=LOCATION, sku={"name": "Y1", "tier": "Dynamic"},
        metadata=skips(("CKV_AZURE_225", "a Consumption plan has no zone redundancy; a zone's outage delays jobs, whose state is in zone-redundant storage")),
    ))
    client_id = f"{BROKER.reference()}.clientId"
    settings = {
        "FUNCTIONS_EXTENSION_VERSION": "~4",
        "FUNCTIONS_WORKER_RUNTIME": "custom",
        # The host's own storage, by identity: no connection string.
        "AzureWebJobsStorage__accountName": ex(STORAGE.names[0]),
        "AzureWebJobsStorage__credential": "managedidentity",
        "AzureWebJobsStorage__clientId": ex(client_id),
        # A Linux Consumption app runs from a package URL, fetched as the broker.
        "WEBSITE_RUN_FROM_PACKAGE": ex(call(
            "concat", f"{STORAGE.reference()}.primaryEndpoints.blob", lit("deployments/"), P("packageBlob"))),
        "WEBSITE_RUN_FROM_PACKAGE_BLOB_MI_RESOURCE_ID": ex(BROKER.id),
        "APPLICATIONINSIGHTS_CONNECTION_STRING": ex(f"{INSIGHTS.reference()}.ConnectionString"),
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING": ex(call("concat", lit("ClientId="), client_id, lit(";Authorization=AAD"))),
        "RESPAWN_STACK": ex(STACK),
        "RESPAWN_KEY": ex(call("concat", lit("@Microsoft.KeyVault(SecretUri="), f"{SECRET.reference()}.secretUri", lit(")"))),
        "RESPAWN_STORAGE_ACCOUNT": ex(STORAGE.names[0]),
        "RESPAWN_STATE_CONTAINER": "state",
        "RESPAWN_CONTAINER": "jobs",
        # The app's default host name (a reference() to the app would be circular).
        "RESPAWN_API_URL": ex(call("concat", lit("https://"), V("appName"), lit("."), P("appServiceDomain"), lit("/api"))),
        "RESPAWN_AZURE_SUBSCRIPTION": ex("subscription().subscriptionId"),
        "RESPAWN_AZURE_RESOURCE_GROUP": ex("resourceGroup().name"),
        "RESPAWN_AZURE_LOCATION": LOCATION,
        "RESPAWN_AZURE_SUBNET": ex(SUBNET.id),
        "RESPAWN_AZURE_NSG": ex(NSG.id),
        "RESPAWN_AZURE_IMAGE": ex(P("agentImage")),
        "RESPAWN_AZURE_AGENT_IDENTITY": ex(AGENT.id),
        "RESPAWN_AZURE_VM_SIZES": ex(P("vmSizes")),
        "RESPAWN_AZURE_MAX_PRICE": ex(P("maxPrice")),
        "RESPAWN_AZURE_POOLS": ex(P("pools")),
        "RESPAWN_PRICES": ex(P("prices")),
        "RESPAWN_AGENT_OTLP_ENDPOINT": ex(P("agentOtlpEndpoint")),
        "OTEL_EXPORTER_OTLP_ENDPOINT": ex(P("otlpEndpoint")),
        # azure_identity picks the user-assigned identity by it.
        "AZURE_CLIENT_ID": ex(client_id),
    }
    resources.append(res(
        SITE,
        {
            "serverFarmId": ex(PLAN.id), "reserved": True,
            "httpsOnly": True, "clientCertEnabled": False, "publicNetworkAccess": "Enabled",
            "keyVaultReferenceIdentity": ex(BROKER.id),
            "siteConfig": {
                "ftpsState": "Disabled", "minTlsVersion": "1.2", "scmMinTlsVersion": "1.2",
                "http20Enabled": True, "remoteDebuggingEnabled": False,
                "functionAppScaleLimit": ex(P("maxInstances")),
                "appSettings": [{"name": k, "value": v} for k, v in settings.items()],
            },
        },
        # The roles first: the host starts with its storage, queues and key.
        [PLAN, BROKER, AGENT, STORAGE, SECRET, INSIGHTS, VNET] + broker_roles,
        kind="functionapp,linux",
        location=LOCATION,
        identity={"type": "UserAssigned", "userAssignedIdentities": {ex(BROKER.id): {}}},
        metadata=skips(
            ("CKV_AZURE_222", "the API is public by design: the CLI, agents on Spot VMs and webhook senders call it, and it authenticates every request itself (bearer tokens, HMAC agent credentials, signed webhooks)"),
            ("CKV_AZURE_17", "the API's clients authenticate with bearer tokens and HMAC signatures, not client certificates"),
            ("CKV_AZURE_212", "a Consumption plan scales from zero by itself; it has no minimum instance count"),
            ("CKV_AZURE_213", "a Consumption plan has no health check; Functions replaces unhealthy hosts itself"),
        ),
    ))
    # No FTP or basic-auth deployment: packages come from the deployments container.
    for kind in ("ftp", "scm"):
        resources.append(res(SITE.child("basicPublishingCredentialsPolicies", lit(kind)), {"allow": False}, [SITE]))


def parameters():
    def p(kind, default, description, **extra):
        d = {"type": kind, "metadata": {"description": description}}
        if default is not None:
            d["defaultValue"] = default
        return {**d, **extra}

    return {
        "stackName": p("string", "respawn", "Prefix of every name: lowercase letters, digits and single '-', starting with a letter (queues are <stackName>-<queue>-<band>[-poison]; VM names <stackName>-<16 hex>, which the broker holds to 40)", minLength=3, maxLength=40),
        "location": p("string", "[resourceGroup().location]", "Where everything runs, the agents' VMs too"),
        "brokerKey": p("securestring", None, "The broker key (RESPAWN_KEY): at least 64 hex digits, e.g. $(openssl rand -hex 32); kept in Key Vault", minLength=64),
        "agentImage": p("string", "Canonical:ubuntu-24_04-lts:server:latest", "The agents' image: an image or gallery image version resource id, or publisher:offer:sku:version; it needs respawn-agent (--features azure), bubblewrap and iptables"),
        "vmSizes": p("string", "", "GPU VM sizes as model:gpus=size,... (empty: respawn's built-in table)"),
        "maxPrice": p("string", "-1", "Spot max price in USD an hour (-1: up to the pay-as-you-go price, evicted for capacity only)"),
        "pools": p("string", "", "Warm pools, ';'-separated (e.g. cpu:max=4,idle=10m;t4:gpus=1,gpu=t4,max=8); empty: every VM is single-use"),
        "otlpEndpoint": p("string", "", "OTLP/HTTP endpoint of a collector for the function app's traces and metrics (OTEL_EXPORTER_OTLP_ENDPOINT; empty: none exported)"),
        "agentOtlpEndpoint": p("string", "", "OTLP/HTTP endpoint the agents on the VMs export their spans to, reachable from the agents' subnet (empty: none exported)"),
        "prices": p("string", "", "Spot and on-demand prices for the saving metric, model=SPOT/ON_DEMAND dollars an hour, comma-separated (e.g. t4=0.16/0.53,cpu=0.02/0.1)"),
        "eventDeliverySchema": p("string", "EventGridSchema", "The schema of the BlobCreated events on the uploads queue", allowedValues=["EventGridSchema", "CloudEventSchemaV1_0"]),
        "storageSku": p("string", "Standard_ZRS", "Replication of the storage account", allowedValues=["Standard_LRS", "Standard_ZRS", "Standard_GRS", "Standard_GZRS", "Standard_RAGRS", "Standard_RAGZRS"]),
        "infrastructureEncryption": p("bool", False, "Encrypt the storage account twice (fixed at creation)"),
        "softDeleteDays": p("int", 7, "Days that deleted blobs and containers, and blobs' old versions, are kept", minValue=1, maxValue=365),
        "vnetAddressPrefix": p("string", "10.42.0.0/16", "The agents' virtual network"),
        "agentsSubnetPrefix": p("string", "10.42.0.0/20", "The agents' subnet, inside vnetAddressPrefix"),
        "maxInstances": p("int", 10, "Most Functions instances at once", minValue=1, maxValue=200),
        "appServiceDomain": p("string", "azurewebsites.net", "The function app's domain (azurewebsites.us, chinacloudsites.cn in other clouds), for RESPAWN_API_URL"),
        "packageBlob": p("string", "respawn-azure.zip", "The function package's blob in the deployments container"),
        "deployerObjectId": p("string", "", "An Entra object id that may upload the function package (Storage Blob Data Contributor on the deployments container); empty: nobody"),
    }


def template():
    resources = []
    broker_roles = identities(resources)
    storage(resources)
    events(resources)
    vault(resources)
    network(resources)
    function_app(resources, broker_roles)
    letters = call("replace", STACK, lit("-"), lit(""))

    def out(value, description):
        return {"type": "string", "value": ex(value), "metadata": {"description": description}}

    host = f"{SITE.reference()}.defaultHostName"
    return {
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "contentVersion": "1.0.0.0",
        "metadata": {"description": "respawn: spot GPU training jobs that survive preemption, as Azure Functions on Storage Queues, Blob storage, Event Grid and Spot VMs"},
        "parameters": parameters(),
        "variables": {
            "stack": ex(call("toLower", P("stackName"))),
            # Storage accounts and vaults: 3-24 letters and digits (vaults: and '-'),
            # unique in Azure; the app's host name is unique too.
            "storageName": ex(call("concat", call("take", letters, 11), UNIQUE)),
            "vaultName": ex(call("concat", call("take", letters, 9), lit("kv"), UNIQUE)),
            "appName": ex(call("concat", STACK, lit("-"), UNIQUE)),
            "planName": ex(call("concat", STACK, lit("-plan"))),
            "workspaceName": ex(call("concat", STACK, lit("-logs"))),
            "insightsName": ex(call("concat", STACK, lit("-insights"))),
            "topicName": ex(call("concat", STACK, lit("-storage-events"))),
            "vnetName": ex(call("concat", STACK, lit("-vnet"))),
            "nsgName": ex(call("concat", STACK, lit("-agents-nsg"))),
            "brokerIdentityName": ex(call("concat", STACK, lit("-broker"))),
            "agentIdentityName": ex(call("concat", STACK, lit("-agent"))),
            "vmLauncherRole": ex(call("guid", "resourceGroup().id", STACK, lit("respawn-vm-launcher"))),
        },
        "resources": resources,
        "outputs": {
            "functionAppName": out(V("appName"), "The function app (upload the package, then restart it)"),
            "functionAppHostName": out(host, "The function app's host name"),
            "apiUrl": out(call("concat", lit("https://"), host, lit("/api")), "respawn --endpoint"),
            "storageAccountName": out(STORAGE.names[0], "Containers state (records, tokens, secrets: the broker only), jobs (uploads trigger jobs), deployments (the function package)"),
            "keyVaultName": out(V("vaultName"), "Holds broker-key"),
            "brokerIdentityId": out(BROKER.id, "The broker's user-assigned identity"),
            "brokerClientId": out(f"{BROKER.reference()}.clientId", "The broker identity's client id"),
            "brokerPrincipalId": out(principal(BROKER), "The broker identity's object id"),
            "agentIdentityId": out(AGENT.id, "The agents' user-assigned identity, given to every agent VM"),
            "agentClientId": out(f"{AGENT.reference()}.clientId", "The agent identity's client id"),
            "agentPrincipalId": out(principal(AGENT), "The agent identity's object id"),
            "agentsSubnetId": out(SUBNET.id, "Where the agents' VMs get their NICs"),
        },
    }


# --- Checks on the finished template ----------------------------------------

TOKEN = re.compile(r"\s*(?:('(?:[^']|'')*')|([A-Za-z_]\w*)|(-?\d+)|(\S))")


def parse(text):
    """An ARM expression (the text inside [...]) as a tree: ('lit', s), ('num', n),
    ('call', name, args) or ('prop', tree, name or index tree)."""
    tokens = [m.groups() for m in TOKEN.finditer(text) if m.group(0).strip()] + [(None, None, None, "end")]
    pos = 0

    def take(punct=None):
        nonlocal pos
        if punct and tokens[pos][3] != punct or tokens[pos][3] == "end":
            raise ValueError(f"expected {punct or 'more'} at token {pos} of {text!r}")
        pos += 1
        return tokens[pos - 1]

    def expr():
        s, ident, num, punct = take()
        if ident is None:
            node = ("lit", s[1:-1].replace("''", "'")) if s else ("num", int(num)) if num else None
            if node is None:
                raise ValueError(f"unexpected {punct!r} in {text!r}")
        else:
            take("(")
            args = []
            while tokens[pos][3] != ")":
                args.append(expr())
                if tokens[pos][3] != ")":
                    take(",")
            take(")")
            node = ("call", ident, args)
        while tokens[pos][3] in (".", "["):
            if take()[3] == ".":
                node = ("prop", node, take()[1])
            else:
                node = ("prop", node, expr())
                take("]")
        return node

    tree = expr()
    if tokens[pos][3] != "end":
        raise ValueError(f"trailing text in {text!r}")
    return tree


def render(node):
    """A name's text, concat() flattened, parameters and variables as {p:x} / {v:x}."""
    if node[0] == "lit":
        return node[1]
    if node[0] == "call" and node[1] == "concat":
        return "".join(render(a) for a in node[2])
    if node[0] == "call" and node[1] in ("parameters", "variables"):
        return "{%s:%s}" % (node[1][0], node[2][0][1])
    return "{%r}" % (node,)


def strings(value, path=""):
    if isinstance(value, (dict, list)):
        for k, v in value.items() if isinstance(value, dict) else enumerate(value):
            yield from strings(k, path) if isinstance(k, str) else ()
            yield from strings(v, f"{path}.{k}")
    elif isinstance(value, str):
        yield path, value


def calls(node):
    if node[0] == "call":
        yield node
        for a in node[2]:
            yield from calls(a)
    elif node[0] == "prop":
        yield from calls(node[1])
        yield from calls(node[2]) if isinstance(node[2], tuple) else ()


def check(t):
    problems = []
    def name(r):
        return render(parse(r["name"][1:-1])) if r["name"].startswith("[") else r["name"]

    defined = {(r["type"].lower(), name(r)) for r in t["resources"]}
    for r in t["resources"]:
        if not re.search(r"\{[pv]:|'variables'", name(r)):
            problems.append(f"{r['name']}: the name is not derived from the parameters")

    def known(rtype, name):
        # A subnet is defined inside its virtual network.
        parent = (rtype.rsplit("/", 1)[0], name.rsplit("/", 1)[0])
        return (rtype, name) in defined or (rtype.endswith("/subnets") and parent in defined)

    for path, s in strings(t):
        if "/subscriptions/" in s.lower():
            problems.append(f"{path}: a hard-coded subscription")
        for guid in re.findall(r"[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}", s, re.I):
            if guid not in BUILTIN_ROLES:
                problems.append(f"{path}: a hard-coded id {guid}")
        if re.search(r"AccountKey=|SharedAccessSignature|[?&]sig=", s):
            problems.append(f"{path}: a key or SAS")
        if not s.startswith("[") or s.startswith("[["):
            continue
        try:
            tree = parse(s[1:-1])
        except ValueError as e:
            problems.append(f"{path}: {e}")
            continue
        if path.endswith(".scope"):
            parts = render(tree).split("/")
            if not known("/".join(parts[:2] + parts[3::2]).lower(), "/".join(parts[2::2])):
                problems.append(f"{path}: scope {s} is not a resource defined here")
        for _, fn, args in calls(tree):
            if fn.startswith("list"):
                problems.append(f"{path}: {fn}() puts a key or secret in the template")
            elif fn in ("parameters", "variables") and args[0][1] not in t[fn]:
                problems.append(f"{path}: no {fn[:-1]} {args[0][1]!r}")
            elif fn == "resourceId" and not known(args[0][1].lower(), "/".join(render(a) for a in args[1:])):
                problems.append(f"{path}: resourceId() of {'/'.join(render(a) for a in args)}, not defined here")
            elif fn == "subscriptionResourceId" and args[1][1] not in BUILTIN_ROLES and (
                    "microsoft.authorization/roledefinitions", render(args[1])) not in defined:
                problems.append(f"{path}: role definition {render(args[1])} is neither built in nor defined here")
    # Each reference() within a resource is to one it depends on, with no cycles.
    names = [r["name"] for r in t["resources"]]
    keys = [(r["type"].lower(), name(r)) for r in t["resources"]]

    def target(rid):  # the resource a resourceId() tree or a name stands for
        if isinstance(rid, str):
            return names.index(rid) if rid in names else target(parse(rid[1:-1])) if rid[:1] == "[" else None
        if rid[0] != "call" or rid[1] != "resourceId":
            return None
        key = (rid[2][0][1].lower(), "/".join(render(a) for a in rid[2][1:]))
        return keys.index(key) if key in keys else None

    deps = [[target(d) for d in r.get("dependsOn", [])] for r in t["resources"]]
    for r, ds in zip(t["resources"], deps):
        if None in ds:
            problems.append(f"{r['name']}: a dependsOn is neither a resourceId() nor a name defined here")
    for i, r in enumerate(t["resources"]):
        seen, todo = set(), [d for d in deps[i] if d is not None]
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += [d for d in deps[n] if d is not None]
        if i in seen:
            problems.append(f"{r['name']}: depends on itself")
        for path, s in strings(r):
            for _, fn, args in calls(parse(s[1:-1])) if s.startswith("[") and not s.startswith("[[") else ():
                if fn == "reference" and target(args[0]) not in seen:
                    problems.append(f"{r['name']}{path}: reference() to a resource it does not depend on")
    # The default stack's queue names, as Azure and respawn's adapter take them.
    stack = t["parameters"]["stackName"]
    if stack["maxLength"] + max(len(queue_suffix(q, b, True)) for q, b in QUEUES) > 63:
        problems.append("stackName's maxLength lets a poison queue's name pass 63 characters")
    for q, b in QUEUES:
        for poison in (False, True):
            n = stack["defaultValue"] + queue_suffix(q, b, poison)
            if not re.fullmatch(r"[a-z0-9](?:-?[a-z0-9])+", n) or len(n) > 63:
                problems.append(f"queue name {n!r} breaks Azure's rules")
    if problems:
        sys.exit("infra/azure/template.py: the template is not sound:\n  " + "\n  ".join(problems))


def main():
    t = template()
    check(t)
    text = json.dumps(t, indent=2) + "\n"
    path = HERE / "template.json"
    if "--check" in sys.argv:
        if not path.exists() or path.read_text() != text:
            sys.exit("infra/azure/template.json is stale: run python3 infra/azure/template.py")
        return
    path.write_text(text)


if __name__ == "__main__":
    main()
