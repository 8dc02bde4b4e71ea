#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use super::github::{GithubEvent, Push, Release};
use super::*;
use crate::spec::{Format, SpecError};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SHA: &str = "6dcb09b5b57875f334f61aebed695e2e4193db5e";

const FILE: &str = r#"
hooks:
  - name: train-on-release
    kind: github
    secret_env: GITHUB_HOOK_SECRET
    on: { events: [push, release], branches: [main, "release/*"] }
    template:
      name: train-${repo_name}-${short_sha}
      command: [python, train.py, --commit, "${sha}"]
      env: { REF: "${ref}", TAG: "${tag}" }
  - name: from-pipeline
    kind: standard
    secret_env: PIPELINE_SECRET
    project: research
    template:
      name: eval-${body.model}
      command: [python, eval.py, --epochs, "${body.epochs}"]
      inputs: ["${body.dataset}"]
"#;

fn env(name: &str) -> Option<String> {
    match name {
        "GITHUB_HOOK_SECRET" => Some("It's a Secret to Everybody".into()),
        "PIPELINE_SECRET" => Some(SECRET.into()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<Vec<Hook>, SpecError> {
    parse_hooks(text, Format::Yaml, &env)
}

/// One hook of `kind` with `extra` lines (indented for a list item) and a template.
fn one(kind: &str, extra: &str, template: &str) -> Result<Vec<Hook>, SpecError> {
    let secret = if kind == "github" {
        "GITHUB_HOOK_SECRET"
    } else {
        "PIPELINE_SECRET"
    };
    parse(&format!(
        "hooks:\n  - name: h\n    kind: {kind}\n    secret_env: {secret}\n{extra}    template: {template}\n"
    ))
}

fn paths(e: &SpecError) -> Vec<&str> {
    e.errors.iter().map(|e| e.path.as_str()).collect()
}

fn push(git_ref: &str) -> GithubEvent {
    GithubEvent::Push(Push {
        git_ref: git_ref.into(),
        after: SHA.into(),
        repo: "octo/vision-models".into(),
        pusher: Some("octocat".into()),
        message: None,
        deleted: false,
    })
}

#[test]
fn the_documented_file_loads() {
    let hooks = parse(FILE).unwrap();
    let [gh, std] = &hooks[..] else {
        panic!("{hooks:?}");
    };
    assert_eq!(
        (gh.name.as_str(), gh.kind),
        ("train-on-release", HookKind::Github)
    );
    assert_eq!(gh.project, "default");
    assert_eq!(gh.on.events, ["push", "release"]);
    assert_eq!(gh.on.branches.len(), 2);
    assert_eq!(
        (std.kind, std.project.as_str()),
        (HookKind::Standard, "research")
    );
    assert_eq!(std.on, GithubFilter::default());
    // No secret in the debug output.
    let shown = format!("{hooks:?}");
    assert!(
        !shown.contains("Everybody") && !shown.contains("MfKQ"),
        "{shown}"
    );
}

#[test]
fn json_files_and_files_on_disk_load_too() {
    let json = r#"{"hooks": [{"name": "j", "kind": "standard", "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "template": {"name": "x", "command": ["x"]}}]}"#;
    assert_eq!(parse_hooks(json, Format::Json, &env).unwrap()[0].name, "j");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hooks.json");
    std::fs::write(&path, json).unwrap();
    assert_eq!(load_hooks(&path).unwrap()[0].name, "j");
    let e = load_hooks(&dir.path().join("absent.yaml")).unwrap_err();
    assert!(e.to_string().starts_with("cannot read"), "{e}");
}

#[test]
fn errors_name_their_field_paths() {
    let two = format!(
        "{FILE}  - name: gpus\n    kind: github\n    secret_env: GITHUB_HOOK_SECRET\n    template: {{ name: x, command: [x], resources: {{ gpus: two }} }}\n"
    );
    let e = parse(&two).unwrap_err();
    assert_eq!(
        e.to_string(),
        "hooks[2].template.resources.gpus: expected a non-negative integer, got \"two\""
    );
    let cases = [
        ("kind: gitlab", "hooks[0].kind"),
        ("colour: blue", "hooks[0].colour"),
        ("on: { events: [push], tags: [v1] }", "hooks[0].on.tags"),
        // Written twice: an error, not the last one silently winning.
        ("on: { events: [push] }", "hooks[0]"),
        ("on: { branches: [\"[\"] }", "hooks[0].on.branches[0]"),
    ];
    for (line, path) in cases {
        let text = FILE.replacen(
            "    kind: github\n",
            &format!("    kind: github\n    {line}\n"),
            1,
        );
        // A second `kind` is a duplicate key, so replace it instead for that case.
        let text = if line.starts_with("kind") {
            FILE.replacen("    kind: github\n", &format!("    {line}\n"), 1)
        } else {
            text
        };
        let e = parse(&text).unwrap_err();
        assert_eq!(paths(&e), [path], "{line}: {e}");
    }
    let e = parse("hooks: {}").unwrap_err();
    assert_eq!(paths(&e), ["hooks"]);
    // Syntax errors say where.
    let e = parse("hooks: [\n").unwrap_err();
    assert!(e.to_string().contains("line 2"), "{e}");
}

#[test]
fn hook_fields_are_checked_together() {
    let text = FILE
        .replace("name: from-pipeline", "name: \"from pipeline\"")
        .replace("project: research", "project: \"\"")
        .replace("events: [push, release]", "events: [push, pull_request]");
    let e = parse(&text).unwrap_err();
    assert_eq!(
        paths(&e),
        ["hooks[0].on.events[1]", "hooks[1].name", "hooks[1].project"]
    );
    let dup = FILE.replace("name: from-pipeline", "name: train-on-release");
    let e = parse(&dup).unwrap_err();
    assert_eq!(
        e.to_string(),
        "hooks[1].name: hook \"train-on-release\" is already defined at hooks[0]"
    );
    let e = one(
        "standard",
        "    on: { events: [push] }\n",
        "{ name: x, command: [x] }",
    )
    .unwrap_err();
    assert_eq!(paths(&e), ["hooks[0].on"]);
}

#[test]
fn secrets_come_from_the_environment_and_are_never_shown() {
    let unset = FILE.replace("secret_env: PIPELINE_SECRET", "secret_env: NOT_SET");
    let e = parse(&unset).unwrap_err();
    assert_eq!(
        e.to_string(),
        "hooks[1].secret_env: environment variable \"NOT_SET\" is not set or empty"
    );
    let both = FILE.replace(
        "secret_env: PIPELINE_SECRET",
        "secret_env: PIPELINE_SECRET\n    secret: whsec_AAAA",
    );
    assert_eq!(paths(&parse(&both).unwrap_err()), ["hooks[1]"]);
    let neither = FILE.replace("    secret_env: PIPELINE_SECRET\n", "");
    assert_eq!(paths(&parse(&neither).unwrap_err()), ["hooks[1]"]);
    // A github secret in a standard hook is not base64.
    let wrong = FILE.replace("PIPELINE_SECRET", "GITHUB_HOOK_SECRET");
    let e = parse(&wrong).unwrap_err();
    assert_eq!(paths(&e), ["hooks[1].secret_env"]);
    assert!(!e.to_string().contains("Everybody"), "{e}");
    let inline = FILE.replace("secret_env: PIPELINE_SECRET", "secret: \"whsec_%%\"");
    let e = parse(&inline).unwrap_err();
    assert_eq!(paths(&e), ["hooks[1].secret"]);
    assert!(!e.to_string().contains("%%"), "{e}");
}

#[test]
fn templates_are_checked_at_load() {
    let e = one("github", "", "{ name: x, command: [\"${nope}\"] }").unwrap_err();
    assert_eq!(
        e.to_string(),
        "hooks[0].template.command[0]: unknown variable ${nope}; known: event, ref, branch, tag, sha, short_sha, repo, repo_name, hook, delivery"
    );
    let e = one(
        "github",
        "",
        "{ name: x, command: [x], idempotency_key: k }",
    )
    .unwrap_err();
    assert_eq!(paths(&e), ["hooks[0].template.idempotency_key"]);
    let e = one("github", "", "[x]").unwrap_err();
    assert_eq!(paths(&e), ["hooks[0].template"]);
    let long = format!("{{ name: {}, command: [x] }}", "n".repeat(129));
    assert_eq!(
        paths(&one("github", "", &long).unwrap_err()),
        ["hooks[0].template.name"]
    );
    // GitHub values are never URIs.
    let e = one(
        "github",
        "",
        "{ name: x, command: [x], inputs: [\"${sha}\"] }",
    )
    .unwrap_err();
    assert_eq!(paths(&e), ["hooks[0].template.inputs[0].uri"]);
    let e = one("standard", "", "{ name: x, command: [\"${body}\"] }").unwrap_err();
    assert!(
        e.to_string()
            .ends_with("known: hook, webhook_id, body.<field>"),
        "{e}"
    );
}

#[test]
fn body_fields_are_reported_only_when_no_body_could_fix_them() {
    // A body field may well be a URI or a URL: the load cannot tell, so it passes.
    one(
        "standard",
        "",
        "{ name: x, command: [x], inputs: [\"${body.data}\"], notify: [\"${body.url}\"] }",
    )
    .unwrap();
    // Wrong whatever the body holds: a relative input path with `..` in front.
    let e = one(
        "standard",
        "",
        "{ name: x, command: [x], inputs: [{ uri: \"s3://b/k\", path: \"../${body.p}\" }] }",
    )
    .unwrap_err();
    assert_eq!(paths(&e), ["hooks[0].template.inputs[0].path"]);
}

#[test]
fn a_push_renders_its_commit_into_the_template() {
    let hooks = parse(FILE).unwrap();
    let gh = &hooks[0];
    let event = push("refs/heads/main");
    gh.accepts(&event).unwrap();
    let vars = HookVars::github(&gh.name, "72d3162e-cc78-11e3-81ab-4c9367dc0958", &event);
    assert_eq!(vars.get("branch"), Some("main"));
    assert_eq!(vars.get("repo"), Some("octo/vision-models"));
    assert_eq!(
        vars.get("delivery"),
        Some("72d3162e-cc78-11e3-81ab-4c9367dc0958")
    );
    let spec = gh.render(&vars, "d-1").unwrap();
    assert_eq!(spec.name, "train-vision-models-6dcb09b");
    assert_eq!(spec.command, ["python", "train.py", "--commit", SHA]);
    assert_eq!(spec.env["REF"], "refs/heads/main");
    assert_eq!(spec.env["TAG"], "");
    assert_eq!(spec.labels[LABEL], "train-on-release");
    assert_eq!(
        spec.idempotency_key.as_deref(),
        Some("hook:train-on-release:d-1")
    );
}

#[test]
fn releases_give_their_tag_and_commitish() {
    let release = |commitish: &str, action: &str| {
        GithubEvent::Release(Release {
            action: action.into(),
            tag_name: "v2.0".into(),
            name: Some("Two".into()),
            repo: "octo/models".into(),
            target_commitish: commitish.into(),
        })
    };
    let on_main = HookVars::github("h", "d", &release("main", "published"));
    assert_eq!(on_main.get("tag"), Some("v2.0"));
    assert_eq!(on_main.get("ref"), Some("refs/tags/v2.0"));
    assert_eq!(on_main.get("branch"), Some("main"));
    assert_eq!(
        (on_main.get("sha"), on_main.get("short_sha")),
        (Some(""), Some(""))
    );
    let at_commit = HookVars::github("h", "d", &release(SHA, "published"));
    assert_eq!(at_commit.get("sha"), Some(SHA));
    assert_eq!(at_commit.get("branch"), Some(""));
    assert_eq!(at_commit.get("event"), Some("release"));

    let gh = &parse(FILE).unwrap()[0];
    gh.accepts(&release("dev", "published")).unwrap();
    let e = gh.accepts(&release("main", "created")).unwrap_err();
    assert!(e.contains("only \"published\""), "{e}");
}

#[test]
fn filters_pick_events_and_branches() {
    let gh = &parse(FILE).unwrap()[0];
    gh.accepts(&push("refs/heads/release/2.1")).unwrap();
    for (event, why) in [
        (push("refs/heads/dev"), "not on a branch in on.branches"),
        (push("refs/heads/release/2.1/rc"), "not on a branch"),
        (push("refs/tags/v1"), "not on a branch"),
        (
            GithubEvent::Ignored {
                event: "issues".into(),
            },
            "makes no job",
        ),
        (GithubEvent::Ping { zen: None }, "makes no job"),
    ] {
        let e = gh.accepts(&event).unwrap_err();
        assert!(e.contains(why), "{event:?}: {e}");
    }
    let GithubEvent::Push(mut deleted) = push("refs/heads/main") else {
        unreachable!()
    };
    deleted.deleted = true;
    let e = gh.accepts(&GithubEvent::Push(deleted)).unwrap_err();
    assert!(e.starts_with("push deleting"), "{e}");

    let releases_only = one(
        "github",
        "    on: { events: [release] }\n",
        "{ name: x, command: [x] }",
    )
    .unwrap();
    let e = releases_only[0]
        .accepts(&push("refs/heads/main"))
        .unwrap_err();
    assert_eq!(e, "event \"push\" is not in on.events");
    // Without filters, tag pushes count too.
    let any = one("github", "", "{ name: x, command: [x] }").unwrap();
    any[0].accepts(&push("refs/tags/v1")).unwrap();
}

#[test]
fn standard_bodies_give_their_top_level_fields() {
    let std = &parse(FILE).unwrap()[1];
    let body = br#"{"model": "resnet/50", "epochs": 3, "dataset": "bucket://projects/research/d", "nested": {"a": 1}, "flag": true}"#;
    let vars = HookVars::standard(&std.name, "msg_1", body);
    assert_eq!(vars.get("body.epochs"), Some("3"));
    assert_eq!(vars.get("body.nested"), None);
    assert_eq!(vars.get("body.flag"), None);
    assert_eq!(vars.get("webhook_id"), Some("msg_1"));
    let spec = std.render(&vars, "msg_1").unwrap();
    assert_eq!(spec.name, "eval-resnet-50");
    assert_eq!(spec.command, ["python", "eval.py", "--epochs", "3"]);
    assert_eq!(spec.inputs[0].uri, "bucket://projects/research/d");
    assert_eq!(
        spec.idempotency_key.as_deref(),
        Some("hook:from-pipeline:msg_1")
    );

    // A body without a field the template needs says which fields it has.
    let e = std
        .render(&HookVars::standard("h", "m", br#"{"model": "m"}"#), "m")
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("unknown variable ${body.epochs}; known: hook, webhook_id, body.model"),
        "{e}"
    );
    let not_json = HookVars::standard("h", "m", b"plain text");
    assert_eq!(not_json.get("body.model"), None);
}

#[test]
fn requests_pick_their_headers_in_any_case() {
    let req = HookRequest::from_headers(
        [
            ("Webhook-Id", "msg_1"),
            ("X-GitHub-Event", "push"),
            ("x-github-event", "ping"),
            ("Content-Type", "application/json"),
        ],
        b"{}".to_vec(),
    );
    assert_eq!(req.webhook_id.as_deref(), Some("msg_1"));
    assert_eq!(req.github_event.as_deref(), Some("push"));
    assert_eq!(req.webhook_signature, None);
    assert_eq!(&req.body[..], b"{}");
}
