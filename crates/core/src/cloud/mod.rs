//! The payloads clouds deliver, decoded into respawn's own events. Hosts (Lambda
//! functions, the local stack) take a message body off their queue and hand it here;
//! nothing in this module does I/O.

pub mod ec2;
pub mod eventgrid;
pub mod s3;

/// A payload that is not what it should be, and where: `path` is a JSON path
/// (`Records[0].s3.object.key`, or under `Message.` inside an SNS notification).
/// The same field error specs report.
pub use crate::spec::FieldError as EventError;

fn at(path: impl Into<String>, message: impl Into<String>) -> EventError {
    EventError {
        path: path.into(),
        message: message.into(),
    }
}

/// `value` as a `T`, or the path and reason it is not one.
fn typed<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, EventError> {
    serde_path_to_error::deserialize(value).map_err(EventError::from_path_error)
}

/// `e`, for a payload found at `outer` inside another.
fn within(mut e: EventError, outer: &str) -> EventError {
    e.path = if e.path.is_empty() {
        outer.to_owned()
    } else {
        format!("{outer}.{}", e.path)
    };
    e
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
