//! The Azure storage emulator (`localstack/azurite-start`, Azurite) for one test,
//! and Azure's own Python SDK to act on it as a user's code would.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Azurite's development account and its well-known key (public, in Azure's docs).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The repository's root: the first folder up from this crate with `localstack/`
/// (this file is also compiled into crates' own tests, by path).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|d| d.join("localstack/azurite-start").is_file())
        .expect("the repository's localstack/ folder")
        .to_owned()
}

/// The emulator of this test process, on Azurite's default ports (Blob 10000,
/// Queue 10001, Table 10002): the ports Azure's SDKs and `object_store`'s emulator
/// mode assume, whose client works around what Azurite lacks (it ignores
/// `startFrom` in listings). Tests share it, with names of their own
/// ([`unique`]). Installed on first use (node, npm, python3 and the registries
/// needed); fails, never skips, when it cannot start; stops when the test process
/// ends.
pub fn azurite() -> &'static Azurite {
    static ONE: std::sync::OnceLock<Azurite> = std::sync::OnceLock::new();
    ONE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        run(
            Command::new(root().join("localstack/azurite-start"))
                .arg("10000")
                .arg(dir.path())
                .env("AZURITE_PARENT_PID", std::process::id().to_string()),
            "localstack/azurite-start (Azurite's default ports 10000-10002 must be free)",
        );
        Azurite {
            _dir: dir,
            blob: format!("http://127.0.0.1:10000/{ACCOUNT}"),
            queue: format!("http://127.0.0.1:10001/{ACCOUNT}"),
        }
    })
}

/// A container or queue name no other test uses (lowercase letters and digits).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        ulid::Ulid::generate().to_string().to_lowercase()
    )
}

/// Azurite, and the development account's endpoints on it.
#[derive(Debug)]
pub struct Azurite {
    /// Its pid and log.
    _dir: tempfile::TempDir,
    /// The Blob endpoint (`http://127.0.0.1:10000/devstoreaccount1`).
    pub blob: String,
    /// The Queue endpoint.
    pub queue: String,
}

impl Azurite {
    /// The development account's connection string, as Azure's SDKs take it.
    pub fn connection_string(&self) -> String {
        format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={};QueueEndpoint={};",
            self.blob, self.queue
        )
    }

    /// Runs a Python snippet with Azure's SDK at hand; `{conn}` in it is the
    /// connection string. Returns what it printed.
    pub fn python(&self, script: &str) -> String {
        let out = run(
            Command::new(root().join(".venv-azure/bin/python"))
                .args(["-c", &script.replace("{conn}", &self.connection_string())]),
            "an azure-storage snippet",
        );
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Creates a blob container.
    pub fn container(&self, name: &str) {
        self.python(&format!(
            "from azure.storage.blob import BlobServiceClient\n\
             BlobServiceClient.from_connection_string('{{conn}}').create_container('{name}')\n"
        ));
    }
}

/// Runs `cmd` to its end; its stdout, or a panic with its stderr when it fails.
fn run(cmd: &mut Command, what: &str) -> Vec<u8> {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what} does not run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
