//! The values a delivery gives a hook's template variables.

use std::collections::BTreeMap;

use serde_json::Value;

use super::github::{GithubEvent, Push};
use crate::trigger::Variables;

/// The variables of a `github` hook, in the order error messages list them.
pub const GITHUB_VARIABLES: [&str; 10] = [
    "event",
    "ref",
    "branch",
    "tag",
    "sha",
    "short_sha",
    "repo",
    "repo_name",
    "hook",
    "delivery",
];

/// Body fields listed by name in an unknown-variable error, at most.
const LISTED_FIELDS: usize = 20;

/// What `${name}` stands for in one delivery (see the module documentation of
/// [`crate::webhook`] for the list).
#[derive(Debug, Clone, PartialEq)]
pub struct HookVars {
    named: Vec<(&'static str, String)>,
    body: Body,
}

#[derive(Debug, Clone, PartialEq)]
enum Body {
    /// A `github` hook: no `${body.…}`.
    None,
    /// A `standard` hook: the body's top-level string and number fields.
    Fields(BTreeMap<String, String>),
    /// The load-time check: every `${body.<field>}` has this value.
    Placeholder(&'static str),
}

impl HookVars {
    /// The variables of a GitHub delivery. Those the event does not give are
    /// empty: a tag push has no branch; a release has a `sha` only when its
    /// `target_commitish` is a commit id, and a `branch` only when it is not.
    pub fn github(hook: &str, delivery: &str, event: &GithubEvent) -> HookVars {
        let mut v = BTreeMap::<&str, String>::new();
        match event {
            GithubEvent::Push(push) => {
                v.insert("ref", push.git_ref.clone());
                v.insert("branch", push.branch().unwrap_or_default().to_owned());
                v.insert("tag", push.tag().unwrap_or_default().to_owned());
                v.insert("sha", push.after.clone());
                v.insert("repo", push.repo.clone());
            }
            GithubEvent::Release(release) => {
                let commitish = &release.target_commitish;
                let slot = if is_commit_id(commitish) {
                    "sha"
                } else {
                    "branch"
                };
                v.insert(slot, commitish.clone());
                v.insert("ref", format!("refs/tags/{}", release.tag_name));
                v.insert("tag", release.tag_name.clone());
                v.insert("repo", release.repo.clone());
            }
            GithubEvent::Ping { .. } | GithubEvent::Ignored { .. } => {}
        }
        let sha = v.get("sha").cloned().unwrap_or_default();
        v.insert("short_sha", sha.chars().take(7).collect());
        let repo = v.get("repo").cloned().unwrap_or_default();
        let repo_name = repo.rsplit('/').next().unwrap_or_default().to_owned();
        v.insert("repo_name", repo_name);
        v.insert("event", event.name().to_owned());
        v.insert("hook", hook.to_owned());
        v.insert("delivery", delivery.to_owned());
        let named = GITHUB_VARIABLES
            .iter()
            .map(|name| (*name, v.remove(name).unwrap_or_default()))
            .collect();
        HookVars {
            named,
            body: Body::None,
        }
    }

    /// The variables of a Standard Webhooks delivery: `${hook}`, `${webhook_id}`
    /// and `${body.<field>}` for each top-level string or number field of a JSON
    /// object body (numbers as JSON writes them). Any other body gives no fields.
    pub fn standard(hook: &str, webhook_id: &str, body: &[u8]) -> HookVars {
        let fields = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => map
                .into_iter()
                .filter_map(|(k, v)| match v {
                    Value::String(s) => Some((k, s)),
                    Value::Number(n) => Some((k, n.to_string())),
                    _ => None,
                })
                .collect(),
            _ => BTreeMap::new(),
        };
        HookVars {
            named: vec![
                ("hook", hook.to_owned()),
                ("webhook_id", webhook_id.to_owned()),
            ],
            body: Body::Fields(fields),
        }
    }

    /// Values shaped like a real push, for checking a `github` template at load.
    pub(super) fn github_placeholder(hook: &str) -> HookVars {
        let push = Push {
            git_ref: "refs/heads/main".into(),
            after: "0123456789abcdef0123456789abcdef01234567".into(),
            repo: "owner/repo".into(),
            pusher: None,
            message: None,
            deleted: false,
        };
        HookVars::github(hook, "placeholder-delivery", &GithubEvent::Push(push))
    }

    /// Values for checking a `standard` template at load; every body field is `body`.
    pub(super) fn standard_placeholder(hook: &str, body: &'static str) -> HookVars {
        HookVars {
            named: vec![
                ("hook", hook.to_owned()),
                ("webhook_id", "placeholder-delivery".into()),
            ],
            body: Body::Placeholder(body),
        }
    }

    /// A variable's value; `None` when `name` is not a variable of this delivery.
    pub fn get(&self, name: &str) -> Option<&str> {
        if let Some((_, value)) = self.named.iter().find(|(n, _)| *n == name) {
            return Some(value);
        }
        let field = name.strip_prefix("body.").filter(|f| !f.is_empty())?;
        match &self.body {
            Body::None => None,
            Body::Fields(fields) => fields.get(field).map(String::as_str),
            Body::Placeholder(value) => Some(value),
        }
    }
}

impl Variables for HookVars {
    fn value(&self, name: &str) -> Option<&str> {
        self.get(name)
    }

    fn known(&self) -> String {
        let mut names: Vec<String> = self.named.iter().map(|(n, _)| (*n).to_owned()).collect();
        match &self.body {
            Body::None => {}
            Body::Placeholder(_) => names.push("body.<field>".into()),
            Body::Fields(fields) => {
                names.extend(
                    fields
                        .keys()
                        .take(LISTED_FIELDS)
                        .map(|f| format!("body.{f}")),
                );
                if fields.len() > LISTED_FIELDS {
                    names.push("…".into());
                }
            }
        }
        names.join(", ")
    }
}

/// A full commit id (SHA-1, or SHA-256 in repositories using it), not a branch name.
fn is_commit_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.chars().all(|c| c.is_ascii_hexdigit())
}
