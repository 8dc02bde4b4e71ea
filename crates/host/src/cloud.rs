//! What the cloud hosts (the Lambda functions, the Azure function app) share
//! besides the handlers: VM deadlines, and the operator's configuration folder.

use std::time::Duration;

use respawn_core::intake::Templates;
use respawn_core::lifecycle::Timeouts;
use respawn_core::trigger::TriggerRule;
use respawn_core::webhook::Hook;
use tracing::warn;

/// Deadlines for cloud VMs: minutes to boot, heartbeats every 30 s.
pub fn cloud_timeouts() -> Timeouts {
    Timeouts {
        redispatch: Duration::from_secs(120),
        allocate: Duration::from_secs(300),
        start: Duration::from_secs(900),
        heartbeat: Duration::from_secs(180),
        preempt_slack: Duration::from_secs(60),
        failure_backoff: Duration::from_secs(10),
        infra_backoff: Duration::from_secs(10),
        capacity_backoff: Duration::from_secs(30),
        capacity_backoff_max: Duration::from_secs(600),
    }
}

/// The trigger rules, templates and hooks in `dir` (each optional); a rejected rule
/// or template is logged and left out, bad hooks stop the host.
pub fn load_config(
    dir: &std::path::Path,
) -> Result<(Vec<TriggerRule>, Templates, Vec<Hook>), String> {
    let triggers = dir.join("triggers");
    let (rules, errors) = if triggers.is_dir() {
        respawn_core::trigger::load_rules_dir(&triggers)
    } else {
        Default::default()
    };
    for (path, e) in errors {
        for err in &e.errors {
            warn!(file = %path.display(), "trigger rule rejected: {err}");
        }
    }
    let templates_dir = dir.join("templates");
    let templates = if templates_dir.is_dir() {
        let (t, errors) = Templates::load_dir(&templates_dir);
        for (path, e) in errors {
            warn!(file = %path.display(), "job template rejected: {e}");
        }
        t
    } else {
        Templates::default()
    };
    let hooks_file = dir.join("hooks.yaml");
    let hooks = if hooks_file.is_file() {
        respawn_core::webhook::load_hooks(&hooks_file)
            .map_err(|e| format!("hooks in {}:\n{e}", hooks_file.display()))?
    } else {
        Vec::new()
    };
    Ok((rules, templates, hooks))
}
