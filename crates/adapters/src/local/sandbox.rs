//! Sandboxing local workloads with bubblewrap (`bwrap`, Debian/Ubuntu package
//! `bubblewrap`).
//!
//! A local "VM" is a process on the broker's own machine, running code from anyone
//! who holds a submit token. In the sandbox it sees the system folders read-only,
//! its own work folder (inputs, checkpoints, outputs) read-write, a private `/tmp`,
//! `/proc` and `/dev` — and nothing of the broker: not the data folder (store,
//! tokens, secrets, other VMs), not the user's home, not other processes (its own
//! pid namespace, which also means that when the agent dies the kernel kills every
//! process of the workload, as a real VM's termination would). It runs without
//! capabilities, in its own user namespace, as an unprivileged user when the broker
//! runs as root.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How a local workload is isolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sandbox {
    /// bubblewrap at this path.
    Bwrap(PathBuf),
    /// None: the workload runs as the broker's user and can read what it can.
    None,
}

impl Sandbox {
    /// The agent's `--sandbox` value.
    pub fn to_arg(&self) -> OsString {
        match self {
            Sandbox::Bwrap(p) => p.clone().into_os_string(),
            Sandbox::None => "none".into(),
        }
    }

    pub fn from_arg(arg: &str) -> Sandbox {
        if arg == "none" {
            Sandbox::None
        } else {
            Sandbox::Bwrap(PathBuf::from(arg))
        }
    }

    pub fn is_none(&self) -> bool {
        *self == Sandbox::None
    }
}

/// What one workload may see.
#[derive(Debug, Clone)]
pub struct Mounts {
    /// The attempt's work folder: the only place it may write (besides `/tmp`).
    pub work: PathBuf,
    /// Extra folders it may read (respawn's example binaries, operator choices).
    pub read_only: Vec<PathBuf>,
    /// Its working directory (inside the sandbox).
    pub cwd: PathBuf,
    /// What [`masked_files`] found, when it was run beforehand (an agent looks while
    /// it restores the checkpoint); `None`: looked up now.
    pub masked: Option<Vec<PathBuf>>,
}

/// System files the workload must not read, masked in its sandbox: those under
/// `/etc` that only root may read, when the sandbox is made by root (none otherwise).
/// In the sandbox's user namespace the broker's root owns nothing, but it maps to the
/// workload's own uid.
pub fn masked_files() -> Vec<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        unreadable_by_others(Path::new("/etc"))
    } else {
        Vec::new()
    }
}

/// Folders every program needs, bound read-only when they exist. On merged-/usr
/// systems `/bin`, `/lib`, … are links into `/usr`, recreated as the same links.
const SYSTEM: [&str; 11] = [
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc",
    "/opt",
    "/nix",
    "/run/systemd/resolve",
];

/// bubblewrap's arguments, up to and including the `--` before the command.
pub fn bwrap_args(m: &Mounts) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&dyn AsRef<std::ffi::OsStr>]| {
        a.extend(items.iter().map(|i| i.as_ref().to_owned()));
    };
    push(&[
        &"--unshare-user",
        &"--unshare-pid",
        &"--unshare-ipc",
        &"--unshare-uts",
        &"--unshare-cgroup-try",
        &"--die-with-parent",
        &"--cap-drop",
        &"ALL",
        &"--hostname",
        &"respawn-vm",
    ]);
    let root = nix::unistd::geteuid().is_root();
    if root {
        // Never uid 0 inside, even without capabilities: tools such as mpirun refuse
        // to run as root, and the broker's files are nobody's business.
        push(&[&"--uid", &"65534", &"--gid", &"65534"]);
    }
    for dir in SYSTEM {
        let path = Path::new(dir);
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(path) {
                    push(&[&"--symlink", &target, &path]);
                }
            }
            Ok(m) if m.is_dir() => push(&[&"--ro-bind", &path, &path]),
            _ => {}
        }
    }
    // Shadow, host keys, …: looked up for each sandbox, never remembered, so that
    // one made since is masked too.
    let masked = m.masked.clone().unwrap_or_else(masked_files);
    for secret in masked {
        if secret.is_dir() {
            push(&[&"--tmpfs", &secret]);
        } else {
            push(&[&"--ro-bind", &"/dev/null", &secret]);
        }
    }
    push(&[
        &"--ro-bind",
        &"/sys",
        &"/sys",
        &"--proc",
        &"/proc",
        &"--dev",
        &"/dev",
        &"--tmpfs",
        &"/dev/shm",
        &"--tmpfs",
        &"/tmp",
    ]);
    // GPUs: the device nodes the driver made, when there are any.
    if let Ok(entries) = std::fs::read_dir("/dev") {
        let mut gpus: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("nvidia") || n == "dri")
            })
            .collect();
        gpus.sort();
        for g in gpus {
            push(&[&"--dev-bind-try", &g, &g]);
        }
    }
    for ro in &m.read_only {
        push(&[&"--ro-bind-try", ro, ro]);
    }
    push(&[&"--bind", &m.work, &m.work, &"--chdir", &m.cwd, &"--"]);
    a
}

/// Files and folders under `dir` that other users may not read, not descending
/// into those (their content is masked with them).
fn unreadable_by_others(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.filter_map(Result::ok) {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.file_type().is_symlink() {
                continue;
            }
            let mode = meta.permissions().mode();
            let readable = mode & 0o004 != 0 && (!meta.is_dir() || mode & 0o001 != 0);
            if !readable {
                out.push(e.path());
            } else if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// bubblewrap when it is installed and can make a sandbox here (user namespaces
/// may be disabled, or the machine a container without them).
pub fn detect() -> Option<PathBuf> {
    let bwrap = find_on_path("bwrap")?;
    let dir = std::env::temp_dir();
    let mounts = Mounts {
        work: dir.clone(),
        read_only: Vec::new(),
        cwd: dir,
        masked: None,
    };
    let ok = Command::new(&bwrap)
        .args(bwrap_args(&mounts))
        .arg("true")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(bwrap)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Every process inside the sandbox whose outermost process is `bwrap_pid`, except
/// the sandbox's own init: the workload and whatever it started, even processes
/// that left its process group. Empty when they cannot be told (`/proc` hidden).
pub fn workload_pids(bwrap_pid: u32) -> Vec<i32> {
    let Some(init) = children(bwrap_pid).into_iter().next() else {
        return Vec::new();
    };
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let Some(inner) = ns(&init.to_string()) else {
        return Vec::new();
    };
    // Guard: never mistake our own namespace for the sandbox's.
    if ns("self").as_ref() == Some(&inner) {
        return Vec::new();
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid as u32 != init)
        .filter(|pid| ns(&pid.to_string()).as_ref() == Some(&inner))
        .collect()
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// On Linux the tests need bubblewrap (`scripts/test` says how to install it):
    /// a sandbox test that skipped itself would check nothing.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_workload_cannot_see_the_broker() {
        let bwrap = detect().expect(
            "bubblewrap is missing or cannot make a sandbox here (apt-get install bubblewrap)",
        );
        let data = tempfile::tempdir().unwrap();
        std::fs::write(data.path().join("admin-token"), "s3cret").unwrap();
        let work = data.path().join("vms/vm-1/work");
        std::fs::create_dir_all(&work).unwrap();
        let mounts = Mounts {
            work: work.clone(),
            read_only: Vec::new(),
            cwd: work.clone(),
            masked: None,
        };
        let script = format!(
            "echo hi > {w}/out; cat {d}/admin-token; cat ../../../admin-token; ls {d}/vms; \
             cat /etc/shadow; touch /usr/x; id -u; echo done",
            w = work.display(),
            d = data.path().display()
        );
        let out = Command::new(bwrap)
            .args(bwrap_args(&mounts))
            .args(["sh", "-c", &script])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("done"), "{out:?}");
        assert!(!stdout.contains("s3cret"), "{stdout}");
        assert!(!stdout.contains("root:"), "{stdout}");
        assert!(!stdout.lines().any(|l| l == "0"), "uid 0 inside: {stdout}");
        assert_eq!(std::fs::read_to_string(work.join("out")).unwrap(), "hi\n");
        assert!(!Path::new("/usr/x").exists());
    }
}
