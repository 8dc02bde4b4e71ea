//! The GitHub events a hook acts on, read from `X-GitHub-Event` and the JSON body.
//! Only the fields a job can use are kept; the rest of GitHub's large payloads is
//! skipped without being checked.

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// One delivery, as far as respawn cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GithubEvent {
    /// Sent when the hook is created: answered, never a job.
    Ping {
        zen: Option<String>,
    },
    Push(Push),
    Release(Release),
    /// Any other event: answered and dropped.
    Ignored {
        event: String,
    },
}

/// A `push`: commits (or a tag) pushed to a ref.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// `ref`: the full ref pushed, `refs/heads/main` or `refs/tags/v1`.
    pub git_ref: String,
    /// `after`: the commit the ref points at now.
    pub after: String,
    /// `repository.full_name`: `owner/name`.
    pub repo: String,
    /// `pusher.name`.
    pub pusher: Option<String>,
    /// `head_commit.message`.
    pub message: Option<String>,
    /// `deleted`: the push removed the ref (`after` is all zeros).
    pub deleted: bool,
}

impl Push {
    /// The branch pushed to; `None` for a tag or another kind of ref.
    pub fn branch(&self) -> Option<&str> {
        self.git_ref.strip_prefix("refs/heads/")
    }

    /// The tag pushed; `None` for a branch.
    pub fn tag(&self) -> Option<&str> {
        self.git_ref.strip_prefix("refs/tags/")
    }
}

/// A `release` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// `action`: `published`, `created`, `edited`, … (only `published` makes a job).
    pub action: String,
    /// `release.tag_name`.
    pub tag_name: String,
    /// `release.name`, which may be unset.
    pub name: Option<String>,
    /// `repository.full_name`.
    pub repo: String,
    /// `release.target_commitish`: the branch or commit the tag was made from.
    pub target_commitish: String,
}

/// Why a delivery's body does not make the event its header names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} event: {message}")]
pub struct EventError {
    pub event: String,
    pub message: String,
}

impl GithubEvent {
    /// Reads a delivery: `event` is the `X-GitHub-Event` header, `body` the raw JSON.
    /// Events other than `ping`, `push` and `release` are [`GithubEvent::Ignored`]
    /// without their body being read.
    pub fn parse(event: &str, body: &[u8]) -> Result<GithubEvent, EventError> {
        Ok(match event {
            "ping" => {
                let wire: PingWire = decode(event, body)?;
                GithubEvent::Ping { zen: wire.zen }
            }
            "push" => {
                let wire: PushWire = decode(event, body)?;
                GithubEvent::Push(Push {
                    git_ref: wire.git_ref,
                    after: wire.after,
                    repo: wire.repository.full_name,
                    pusher: wire.pusher.and_then(|p| p.name),
                    message: wire.head_commit.and_then(|c| c.message),
                    deleted: wire.deleted,
                })
            }
            "release" => {
                let wire: ReleaseWire = decode(event, body)?;
                GithubEvent::Release(Release {
                    action: wire.action,
                    tag_name: wire.release.tag_name,
                    name: wire.release.name,
                    repo: wire.repository.full_name,
                    target_commitish: wire.release.target_commitish,
                })
            }
            other => GithubEvent::Ignored {
                event: other.to_owned(),
            },
        })
    }

    /// The event's name, as `X-GitHub-Event` gives it.
    pub fn name(&self) -> &str {
        match self {
            GithubEvent::Ping { .. } => "ping",
            GithubEvent::Push(_) => "push",
            GithubEvent::Release(_) => "release",
            GithubEvent::Ignored { event } => event,
        }
    }
}

/// Decodes `body`, naming the field path of whatever is missing or mistyped.
fn decode<T: DeserializeOwned>(event: &str, body: &[u8]) -> Result<T, EventError> {
    let error = |message: String| EventError {
        event: event.to_owned(),
        message,
    };
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if e.inner().is_syntax() || e.inner().is_eof() {
            error(format!("the body is not JSON: {}", e.inner()))
        } else if path == "." {
            error(e.inner().to_string())
        } else {
            error(format!("{path}: {}", e.inner()))
        }
    })?;
    de.end()
        .map_err(|e| error(format!("the body is not JSON: {e}")))?;
    Ok(value)
}

#[derive(Deserialize)]
struct PingWire {
    #[serde(default)]
    zen: Option<String>,
}

#[derive(Deserialize)]
struct PushWire {
    #[serde(rename = "ref")]
    git_ref: String,
    after: String,
    repository: RepoWire,
    #[serde(default)]
    pusher: Option<PusherWire>,
    #[serde(default)]
    head_commit: Option<CommitWire>,
    #[serde(default)]
    deleted: bool,
}

#[derive(Deserialize)]
struct ReleaseWire {
    action: String,
    release: ReleaseFields,
    repository: RepoWire,
}

#[derive(Deserialize)]
struct ReleaseFields {
    tag_name: String,
    #[serde(default)]
    name: Option<String>,
    target_commitish: String,
}

#[derive(Deserialize)]
struct RepoWire {
    full_name: String,
}

#[derive(Deserialize)]
struct PusherWire {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct CommitWire {
    #[serde(default)]
    message: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use super::*;

    const SHA: &str = "6dcb09b5b57875f334f61aebed695e2e4193db5e";

    fn push_body(git_ref: &str) -> String {
        serde_json::json!({
            "ref": git_ref,
            "before": "0000000000000000000000000000000000000000",
            "after": SHA,
            "deleted": false,
            "repository": { "id": 1, "full_name": "octo/models", "name": "models" },
            "pusher": { "name": "octocat", "email": "octocat@example.com" },
            "head_commit": { "id": SHA, "message": "Tune the learning rate" },
            "commits": [],
        })
        .to_string()
    }

    #[test]
    fn push_events_keep_what_a_job_uses() {
        let event = GithubEvent::parse("push", push_body("refs/heads/main").as_bytes()).unwrap();
        let GithubEvent::Push(push) = &event else {
            panic!("{event:?}");
        };
        assert_eq!(push.git_ref, "refs/heads/main");
        assert_eq!(push.branch(), Some("main"));
        assert_eq!(push.tag(), None);
        assert_eq!(push.after, SHA);
        assert_eq!(push.repo, "octo/models");
        assert_eq!(push.pusher.as_deref(), Some("octocat"));
        assert_eq!(push.message.as_deref(), Some("Tune the learning rate"));
        assert!(!push.deleted);
        assert_eq!(event.name(), "push");

        let tag = GithubEvent::parse("push", push_body("refs/tags/v1.2").as_bytes()).unwrap();
        let GithubEvent::Push(tag) = tag else {
            panic!("{tag:?}");
        };
        assert_eq!((tag.branch(), tag.tag()), (None, Some("v1.2")));
    }

    #[test]
    fn release_events_keep_their_action() {
        let body = serde_json::json!({
            "action": "published",
            "release": { "tag_name": "v2.0", "name": null, "target_commitish": "main", "draft": false },
            "repository": { "full_name": "octo/models" },
        });
        let event = GithubEvent::parse("release", body.to_string().as_bytes()).unwrap();
        assert_eq!(
            event,
            GithubEvent::Release(Release {
                action: "published".into(),
                tag_name: "v2.0".into(),
                name: None,
                repo: "octo/models".into(),
                target_commitish: "main".into(),
            })
        );
    }

    #[test]
    fn ping_and_unknown_events() {
        let ping = GithubEvent::parse(
            "ping",
            br#"{"zen":"Keep it logically awesome.","hook_id":1}"#,
        );
        assert_eq!(
            ping.unwrap(),
            GithubEvent::Ping {
                zen: Some("Keep it logically awesome.".into())
            }
        );
        // Other events are not read, so any body will do.
        let issues = GithubEvent::parse("issues", b"not even json").unwrap();
        assert_eq!(
            issues,
            GithubEvent::Ignored {
                event: "issues".into()
            }
        );
    }

    #[test]
    fn broken_bodies_say_which_field() {
        let cases = [
            ("push", "{}".to_owned(), "push event: missing field `ref`"),
            (
                "push",
                push_body("refs/heads/main").replace("\"full_name\":\"octo/models\",", ""),
                "push event: repository: missing field `full_name`",
            ),
            (
                "release",
                r#"{"action":"published","release":{"tag_name":2,"target_commitish":"main"},"repository":{"full_name":"a/b"}}"#.to_owned(),
                "release event: release.tag_name: invalid type",
            ),
            ("push", "{\"ref\": ".to_owned(), "push event: the body is not JSON"),
            ("ping", "[] x".to_owned(), "ping event: the body is not JSON"),
        ];
        for (event, body, expected) in cases {
            let e = GithubEvent::parse(event, body.as_bytes()).unwrap_err();
            assert!(e.to_string().starts_with(expected), "{e}");
        }
    }
}
