//! Emulated EC2 VMs: the emulator's instances never boot, so for each instance of
//! a stack that the emulator reports running, this runs the instance's own user
//! data (read back from EC2) on this machine, with an IMDSv2 endpoint of its own
//! and shims for what a test must not do to the machine (`iptables`, `shutdown`).
//! When the user data ends (the agent is done, `shutdown -h now`), the instance is
//! terminated and EC2's state change is put on EventBridge, as on AWS.
//! [`Vms::interrupt`] does what EC2 does two minutes before reclaiming a spot
//! instance: the metadata's `spot/instance-action` and EventBridge's warning.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, put};

use crate::aws::Emulator;

/// What one VM's metadata service says.
#[derive(Debug, Default)]
struct Metadata {
    instance_id: String,
    /// `spot/instance-action`, once the instance is to be reclaimed.
    action: Option<String>,
}

type Shared = Arc<Mutex<Metadata>>;

const TOKEN: &str = "emulated-imds-token";

fn authorized(h: &HeaderMap) -> bool {
    h.get("x-aws-ec2-metadata-token")
        .is_some_and(|t| t.as_bytes() == TOKEN.as_bytes())
}

async fn imds(meta: Shared) -> String {
    let app = Router::new()
        .route(
            "/latest/api/token",
            put(|h: HeaderMap| async move {
                if h.contains_key("x-aws-ec2-metadata-token-ttl-seconds") {
                    (StatusCode::OK, TOKEN.to_owned())
                } else {
                    (StatusCode::BAD_REQUEST, String::new())
                }
            }),
        )
        .route(
            "/latest/meta-data/instance-id",
            get(|State(m): State<Shared>, h: HeaderMap| async move {
                if !authorized(&h) {
                    return (StatusCode::UNAUTHORIZED, String::new());
                }
                (StatusCode::OK, m.lock().unwrap().instance_id.clone())
            }),
        )
        .route(
            "/latest/meta-data/spot/instance-action",
            get(|State(m): State<Shared>, h: HeaderMap| async move {
                if !authorized(&h) {
                    return (StatusCode::UNAUTHORIZED, String::new());
                }
                match m.lock().unwrap().action.clone() {
                    Some(a) => (StatusCode::OK, a),
                    None => (StatusCode::NOT_FOUND, String::new()),
                }
            }),
        )
        .route(
            "/latest/meta-data/events/recommendations/rebalance",
            get(|| async { StatusCode::NOT_FOUND }),
        )
        .with_state(meta);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

#[derive(Debug)]
struct Vm {
    child: Child,
    meta: Shared,
}

/// The stack's emulated VMs.
#[derive(Debug)]
pub struct Vms {
    stack: String,
    root: tempfile::TempDir,
    shims: PathBuf,
    env: Vec<(String, String)>,
    vms: HashMap<String, Vm>,
    /// Instances whose VM has ended.
    ended: Vec<String>,
}

impl Vms {
    /// `env` is what every VM's agent gets besides the user data (the S3
    /// endpoint and credentials an instance profile would give).
    pub fn new(stack: &str, env: Vec<(String, String)>) -> Vms {
        let root = tempfile::tempdir().unwrap();
        // As /var/lib/respawn on a VM: the workload (another uid) passes through.
        std::fs::set_permissions(
            root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        let shims = root.path().join("shims");
        crate::vm_shims(&shims);
        Vms {
            stack: stack.to_owned(),
            root,
            shims,
            env,
            vms: HashMap::new(),
            ended: Vec::new(),
        }
    }

    /// Starts a VM for each running instance without one; ends the instances
    /// whose VM shut down.
    pub async fn step(&mut self, aws: &Emulator) {
        let listed = aws.drive_python(&format!(
            r#"
import boto3
ec2 = boto3.client("ec2", endpoint_url="{{endpoint}}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
found = ec2.describe_instances(Filters=[{{"Name": "tag:respawn:stack", "Values": ["{stack}"]}},
                                        {{"Name": "instance-state-name", "Values": ["pending", "running"]}}])
for r in found["Reservations"]:
    for i in r["Instances"]:
        print(i["InstanceId"])
"#,
            stack = self.stack
        ));
        for id in listed.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if self.vms.contains_key(id) || self.ended.iter().any(|e| e == id) {
                continue;
            }
            let vm = self.boot(aws, id).await;
            self.vms.insert(id.to_owned(), vm);
        }
        let mut done = Vec::new();
        for (id, vm) in &mut self.vms {
            if vm.child.try_wait().unwrap().is_some() {
                done.push(id.clone());
            }
        }
        for id in done {
            self.vms.remove(&id);
            self.ended.push(id.clone());
            // The user data ran `shutdown -h now`; the instance terminates on it.
            aws.python(&format!(
                r#"
import json, boto3
kw = dict(endpoint_url="{{endpoint}}", region_name="us-east-1",
          aws_access_key_id="test", aws_secret_access_key="test")
boto3.client("ec2", **kw).terminate_instances(InstanceIds=["{id}"])
boto3.client("events", **kw).put_events(Entries=[{{"Source": "aws.ec2",
    "DetailType": "EC2 Instance State-change Notification",
    "Detail": json.dumps({{"instance-id": "{id}", "state": "terminated"}})}}])
"#
            ));
        }
    }

    async fn boot(&self, aws: &Emulator, id: &str) -> Vm {
        let script = aws.drive_python(&format!(
            r#"
import base64, boto3
ec2 = boto3.client("ec2", endpoint_url="{{endpoint}}", region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
ud = ec2.describe_instance_attribute(InstanceId="{id}", Attribute="userData")["UserData"]["Value"]
print(base64.b64decode(ud).decode(), end="")
"#
        ));
        let meta: Shared = Arc::new(Mutex::new(Metadata {
            instance_id: id.to_owned(),
            action: None,
        }));
        let endpoint = imds(meta.clone()).await;
        let user_data = self.root.path().join(format!("{id}.user-data"));
        std::fs::write(&user_data, script).unwrap();
        let bin = crate::binary("respawn-agent");
        let path = std::env::join_paths(
            [self.shims.clone(), bin.parent().unwrap().to_owned()]
                .into_iter()
                .chain(std::env::split_paths(
                    &std::env::var_os("PATH").unwrap_or_default(),
                )),
        )
        .unwrap();
        let log = std::fs::File::create(self.root.path().join(format!("{id}.log"))).unwrap();
        let child = Command::new("bash")
            .arg("-x")
            .arg(&user_data)
            .env_clear()
            .env("PATH", path)
            .env("RESPAWN_IMDS", &endpoint)
            .env("RESPAWN_VM_ROOT", self.root.path())
            // The workload's binaries (respawn-trainer) are on the image's PATH.
            .env(
                "RESPAWN_AGENT_ARGS",
                format!("--read-only {}", bin.parent().unwrap().display()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        Vm { child, meta }
    }

    /// EC2's two-minute warning for `instance`: in its metadata, and on EventBridge.
    pub fn interrupt(&self, aws: &Emulator, instance: &str) {
        let at = humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() + std::time::Duration::from_secs(120),
        );
        let vm = self.vms.get(instance).expect("a running VM");
        vm.meta.lock().unwrap().action =
            Some(format!(r#"{{"action": "terminate", "time": "{at}"}}"#));
        aws.python(&format!(
            r#"
import json, boto3
boto3.client("events", endpoint_url="{{endpoint}}", region_name="us-east-1",
             aws_access_key_id="test", aws_secret_access_key="test").put_events(Entries=[{{
    "Source": "aws.ec2", "DetailType": "EC2 Spot Instance Interruption Warning",
    "Detail": json.dumps({{"instance-id": "{instance}", "instance-action": "terminate"}})}}])
"#
        ));
    }

    /// The VMs running now, by instance id.
    pub fn running(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.vms.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// What every VM printed, ended ones too.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.root.path())
            .unwrap()
            .filter_map(Result::ok)
        {
            if e.path().extension().is_some_and(|x| x == "log") {
                out.push_str(&format!("--- {}\n", e.path().display()));
                out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
            }
        }
        out
    }

    /// What VM `instance` printed (its user data and agent).
    pub fn log(&self, instance: &str) -> String {
        std::fs::read_to_string(self.root.path().join(format!("{instance}.log")))
            .unwrap_or_default()
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }
}

impl Drop for Vms {
    fn drop(&mut self) {
        for vm in self.vms.values_mut() {
            let pid = nix::unistd::Pid::from_raw(-(vm.child.id() as i32));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = vm.child.wait();
        }
    }
}
