//! The payloads clouds deliver, decoded into respawn's own events. Hosts (Lambda
//! functions, the local stack) take a message body off their queue and hand it here;
//! nothing in this module does I/O.

pub mod ec2;
pub mod s3;

/// A payload that is not what it should be, and where: `path` is a JSON path
/// (`Records[0].s3.object.key`, or under `Message.` inside an SNS notification).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct EventError {
    pub path: String,
    pub message: String,
}

impl EventError {
    fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        EventError {
            path: path.into(),
            message: message.into(),
        }
    }

    fn from_path_error(e: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        EventError::at(path, e.into_inner().to_string())
    }

    fn within(mut self, outer: &str) -> Self {
        self.path = if self.path.is_empty() {
            outer.to_owned()
        } else {
            format!("{outer}.{}", self.path)
        };
        self
    }
}

/// A payload kept under `schemas/fixtures/aws/`.
#[cfg(test)]
fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../schemas/fixtures/aws/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}
