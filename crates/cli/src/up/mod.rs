//! `respawn up`: every function of the broker in one process, on the embedded
//! adapters — the local bucket folder, the durable local ledger and queue, the local
//! compute provider — with the HTTP API on localhost.

pub mod api;
mod bucket;
mod dispatch;
mod keys;

use respawn_host::{intake, loops, notify, replies};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::local::LocalFileSystem;
use respawn_adapters::local::sandbox::{self, Sandbox};
use respawn_adapters::local::{
    LocalCompute, LocalComputeConfig, LocalSecrets, LocalStore, detect_container_runtime,
    detect_gpus, sibling_binary, spawn_spot_chaos,
};
use respawn_core::lifecycle::Timeouts;
use respawn_core::ports::{Blobs, Ports, QueueNames};
use respawn_core::seal::SealedQueue;
use respawn_core::time::SystemClock;
use tokio::sync::watch;
use tracing::{info, warn};

pub use api::app;

/// Settings of the local stack.
#[derive(Debug, Clone)]
pub struct UpConfig {
    pub data: PathBuf,
    pub triggers: Option<PathBuf>,
    /// The webhooks file (YAML/JSON).
    pub hooks: Option<PathBuf>,
    pub listen: SocketAddr,
    pub cpu_slots: usize,
    pub notice: Duration,
    /// Mean time between random preemptions; `None` = only on demand.
    pub chaos: Option<Duration>,
    pub heartbeat_secs: u64,
    /// A queue server (amqp://…) for the broker's queues; `None`: the local store.
    pub queue_url: Option<String>,
    /// Prefix of the broker's queue names (several brokers can share a server).
    pub queue_prefix: String,
    /// A folder of job templates for queue submissions.
    pub templates: Option<PathBuf>,
    /// How workloads are isolated from the broker and each other.
    pub isolation: Isolation,
    /// Lets notify URLs reach loopback, link-local and private addresses (local
    /// development); off, such URLs are refused.
    pub allow_private_notify: bool,
    /// Pools of reusable VMs.
    pub pools: Vec<respawn_core::pool::PoolSpec>,
}

/// `respawn up --isolation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Isolation {
    /// The sandbox where this machine has one; else unsandboxed, with only the
    /// local admin's own jobs (no tokens for others).
    #[default]
    Auto,
    /// The sandbox, or refuse to start.
    Sandbox,
    /// No sandbox, knowingly: workloads can read what the broker's user can.
    None,
}

/// The running stack's handles, shared by the loops and the API.
#[derive(Debug, Clone)]
pub struct Stack {
    pub ports: Ports,
    pub replies: replies::Replies,
    pub templates: Arc<respawn_core::intake::Templates>,
    pub hooks: Arc<Vec<respawn_core::webhook::Hook>>,
    pub tokens: Arc<dyn respawn_core::ports::Tokens>,
    pub compute: Arc<LocalCompute>,
    pub config: UpConfig,
    /// Checks the credentials agents report with.
    pub attempt_key: respawn_core::attempt_auth::AttemptKey,
    /// Whether workloads run sandboxed.
    pub sandboxed: bool,
    pub rules: Arc<std::sync::RwLock<Vec<respawn_core::trigger::TriggerRule>>>,
    /// What the broker counts (`GET /metrics`, `respawn status`).
    pub metrics: Arc<respawn_host::metrics::Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Setup(String),
}

/// Operator deadlines for the local stack: agents heartbeat every few seconds and
/// VMs start in well under a second, so losses are noticed quickly.
pub(crate) fn local_timeouts(heartbeat_secs: u64) -> Timeouts {
    Timeouts {
        redispatch: Duration::from_secs(30),
        allocate: Duration::from_secs(60),
        start: Duration::from_secs(120),
        heartbeat: Duration::from_secs((heartbeat_secs * 10).max(20)),
        preempt_slack: Duration::from_secs(10),
        failure_backoff: Duration::from_secs(1),
        infra_backoff: Duration::from_secs(1),
        // A slot frees when a local VM ends, and the dispatcher wakes on that; the
        // backoff only covers a job that fits no slot free at the time.
        capacity_backoff: Duration::from_millis(250),
        capacity_backoff_max: Duration::from_secs(2),
    }
}

/// The sandbox `isolation` asks for, or why it cannot be had.
fn choose_sandbox(isolation: Isolation) -> Result<Sandbox, Error> {
    if isolation == Isolation::None {
        warn!("--isolation none: workloads run unsandboxed and can read what this user can");
        return Ok(Sandbox::None);
    }
    match sandbox::detect() {
        Some(bwrap) => {
            info!(bwrap = %bwrap.display(), "workloads run sandboxed");
            Ok(Sandbox::Bwrap(bwrap))
        }
        None if isolation == Isolation::Sandbox => Err(Error::Setup(
            "--isolation sandbox: bubblewrap (bwrap) is missing or cannot make a sandbox here \
             (install the bubblewrap package; user namespaces must be enabled)"
                .into(),
        )),
        None => {
            warn!(
                "no sandbox on this machine (bubblewrap missing or user namespaces disabled): \
                 workloads run as this user and can read its files, so only the local admin's \
                 own jobs run; tokens for others need --isolation none"
            );
            Ok(Sandbox::None)
        }
    }
}

/// Builds the stack on the data folder.
pub async fn open(mut config: UpConfig) -> Result<Stack, Error> {
    let setup = |what: &str, e: &dyn std::fmt::Display| Error::Setup(format!("{what}: {e}"));
    // Absolute once, here: agents and workloads run in other working directories,
    // and the file watcher reports absolute paths.
    config.data = std::path::absolute(&config.data)
        .map_err(|e| setup("cannot resolve the data folder", &e))?;
    let bucket_dir = config.data.join("bucket");
    std::fs::create_dir_all(&bucket_dir)
        .map_err(|e| setup("cannot create the bucket folder", &e))?;
    let store = LocalStore::open(&config.data).map_err(|e| setup("cannot open the store", &e))?;
    // fsync'd: what an agent or a user reads from the bucket survives a power loss.
    let blobs: Blobs = Arc::new(
        LocalFileSystem::new_with_prefix(&bucket_dir)
            .map_err(|e| setup("cannot open the bucket", &e))?
            .with_fsync(true),
    );
    let sandbox = choose_sandbox(config.isolation)?;
    let attempt_key = keys::attempt_key(&config.data)
        .map_err(|e| setup("cannot read or create the agent key", &e))?;
    let queues = QueueNames::with_prefix(&config.queue_prefix);
    let (queue, replies) = open_queue(&config, &store).await?;
    // Only the broker writes its own queues: what it did not seal is dead-lettered
    // unread (the queue server may be reachable by workloads, on loopback).
    let queue: Arc<dyn respawn_core::ports::Queue> = Arc::new(SealedQueue::new(
        queue,
        &attempt_key.derive("respawn queue seal"),
        [
            queues.dispatch.clone(),
            queues.events.clone(),
            queues.notify.clone(),
        ],
    ));
    let agent_bin = sibling_binary("respawn-agent").ok_or_else(|| {
        Error::Setup(
            "respawn-agent not found next to respawn; build the workspace (cargo build)".into(),
        )
    })?;
    let gpus = detect_gpus();
    let compute = LocalCompute::open(
        LocalComputeConfig {
            data_dir: config.data.clone(),
            bucket_dir,
            extra_path: agent_bin.parent().map(PathBuf::from),
            agent_bin,
            cpu_slots: config.cpu_slots,
            gpus: gpus.clone(),
            container_runtime: detect_container_runtime(),
            events_queue: queues.events.clone(),
            api: api_url(config.listen),
            attempt_key: attempt_key.clone(),
            heartbeat_secs: config.heartbeat_secs,
            notice: config.notice,
            sandbox: sandbox.clone(),
            pools: config.pools.clone(),
        },
        // What it reports continues the trace of the attempt it reports on.
        Arc::new(respawn_host::traced::TracedQueue(queue.clone())),
    )
    .await
    .map_err(|e| setup("cannot open the local compute provider", &e))?;
    info!(gpus = ?gpus, cpu_slots = config.cpu_slots, pools = ?config.pools.iter().map(ToString::to_string).collect::<Vec<_>>(), "local compute ready");
    let prices = respawn_host::metrics::Prices::from_env().map_err(Error::Setup)?;
    let metrics = Arc::new(respawn_host::metrics::Metrics::new("local", prices));
    let ledger: Arc<dyn respawn_core::ports::Ledger> = Arc::new(store.ledger());
    metrics
        .load(ledger.as_ref())
        .await
        .map_err(|e| setup("cannot count the jobs in the store", &e))?;
    let ports = Ports {
        ledger: Arc::new(respawn_host::metrics::MeteredLedger::new(
            ledger,
            metrics.clone(),
        )),
        queue,
        compute: compute.clone(),
        secrets: Arc::new(LocalSecrets::new(config.data.join("secrets"))),
        blobs,
        clock: Arc::new(SystemClock),
        timeouts: local_timeouts(config.heartbeat_secs),
        queues,
    };
    let ports = respawn_host::traced::traced(ports);
    let rules = load_rules(config.triggers.as_deref());
    make_rule_folders(&config.data.join("bucket"), &rules);
    let hooks = match &config.hooks {
        Some(path) => respawn_core::webhook::load_hooks(path)
            .map_err(|e| Error::Setup(format!("hooks in {}:\n{e}", path.display())))?,
        None => Vec::new(),
    };
    for h in &hooks {
        info!(hook = %h.name, url = %format!("/v1/hooks/{}", h.name), "webhook ready");
    }
    let templates = load_templates(config.templates.as_deref());
    Ok(Stack {
        replies,
        templates: Arc::new(templates),
        hooks: Arc::new(hooks),
        tokens: Arc::new(store.tokens()),
        ports,
        compute,
        config,
        rules: Arc::new(std::sync::RwLock::new(rules)),
        attempt_key,
        sandboxed: !sandbox.is_none(),
        metrics,
    })
}

/// Where agents reach the API: the listen address, loopback when it listens on all.
fn api_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// Makes the folders trigger rules watch (`incoming/` for `prefix: incoming/`), so
/// that a user can copy files into them as soon as the stack is up.
fn make_rule_folders(bucket: &std::path::Path, rules: &[respawn_core::trigger::TriggerRule]) {
    for r in rules {
        let prefix = r.when.prefix.as_str();
        // `incoming/img` watches names starting with `img` in `incoming/`.
        let folder = prefix.rsplit_once('/').map_or("", |(dir, _)| dir);
        if folder.is_empty() || folder.split('/').any(|p| p == ".." || p.is_empty()) {
            continue;
        }
        if let Err(e) = std::fs::create_dir_all(bucket.join(folder)) {
            warn!(rule = %r.name, folder, error = %e, "cannot create the rule's bucket folder");
        }
    }
}

/// The broker's queue backend: RabbitMQ for `amqp://` URLs, else the local store.
async fn open_queue(
    config: &UpConfig,
    store: &LocalStore,
) -> Result<(Arc<dyn respawn_core::ports::Queue>, replies::Replies), Error> {
    let Some(url) = &config.queue_url else {
        let q = store.queue(respawn_core::ports::queue::DEFAULT_MAX_DELIVERIES);
        return Ok((Arc::new(q), replies::Replies::None));
    };
    #[cfg(feature = "amqp")]
    {
        use respawn_adapters::amqp::{AmqpOptions, AmqpQueue};
        let options = AmqpOptions {
            connection_name: format!("respawn-up-{}", config.queue_prefix.trim_end_matches('.')),
            // Enough unacked submissions in flight for the store's group commits to
            // fill up; each message waits only for its own job to be durable.
            prefetch: 256,
            // Larger submissions are dead-lettered before their bodies are buffered.
            max_message_bytes: respawn_core::intake::MAX_MESSAGE_BYTES,
            ..AmqpOptions::default()
        };
        let q = AmqpQueue::connect(url, options)
            .await
            .map_err(|e| Error::Setup(format!("cannot connect to {}: {e}", redact(url))))?;
        info!(server = %redact(url), prefix = %config.queue_prefix, "queues on RabbitMQ");
        Ok((Arc::new(q.clone()), replies::Replies::Amqp(q)))
    }
    #[cfg(not(feature = "amqp"))]
    {
        Err(Error::Setup(format!(
            "{}: RabbitMQ is not supported in this build (feature amqp)",
            redact(url)
        )))
    }
}

/// A URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

fn load_templates(dir: Option<&std::path::Path>) -> respawn_core::intake::Templates {
    let Some(dir) = dir else {
        return Default::default();
    };
    let (templates, errors) = respawn_core::intake::Templates::load_dir(dir);
    for (path, e) in errors {
        warn!(file = %path.display(), "job template rejected: {e}");
    }
    if !templates.names().is_empty() {
        info!(templates = %templates.names(), "job templates loaded");
    }
    templates
}

/// Loads trigger rules; a bad rule is reported and skipped, the rest still serve.
pub fn load_rules(dir: Option<&std::path::Path>) -> Vec<respawn_core::trigger::TriggerRule> {
    let Some(dir) = dir else { return Vec::new() };
    let (rules, errors) = respawn_core::trigger::load_rules_dir(dir);
    for (path, e) in errors {
        for err in &e.errors {
            warn!(file = %path.display(), "trigger rule rejected: {err}");
        }
    }
    for r in &rules {
        info!(rule = %r.name, "trigger rule loaded");
    }
    rules
}

/// Runs until `shutdown` flips; then preempts the running VMs (they checkpoint and
/// resume on the next start) and stops.
pub async fn run(stack: Stack, mut shutdown: watch::Receiver<bool>) -> Result<(), Error> {
    api::ensure_admin_token(&stack)
        .await
        .map_err(Error::Setup)?;
    // Queues exist before anyone can publish to them: a broker drops messages sent
    // to a queue that does not exist yet.
    let q = &stack.ports.queues;
    for name in [&q.submit, &q.dispatch, &q.events, &q.notify] {
        stack
            .ports
            .queue
            .declare(name)
            .await
            .map_err(|e| Error::Setup(format!("cannot declare queue {name}: {e}")))?;
    }
    let listener = tokio::net::TcpListener::bind(stack.config.listen)
        .await
        .map_err(|e| Error::Setup(format!("cannot listen on {}: {e}", stack.config.listen)))?;
    info!(address = %stack.config.listen, data = %stack.config.data.display(), "respawn up: serving");
    tracing::debug!(routes = ?api::ROUTES, "api routes");

    let (stop_tx, stop_rx) = watch::channel(false);
    // Events first: reports that arrived while the broker was down update the
    // ledger before any deadline is judged.
    loops::drain_events(&stack.ports).await;
    let mut tasks = vec![
        tokio::spawn(loops::events(stack.ports.clone(), stop_rx.clone())),
        tokio::spawn(loops::reconcile(stack.ports.clone(), stop_rx.clone())),
        tokio::spawn(bucket::watch(stack.clone(), stop_rx.clone())),
    ];
    // A scrape reads the queues itself; only an export needs them read between.
    if respawn_telemetry::metrics_exported() {
        tasks.push(tokio::spawn(loops::sample_queues(
            stack.metrics.clone(),
            stack.ports.clone(),
            stop_rx.clone(),
        )));
    }
    let (notify_secret, _) = keys::notify_secret(&stack.config.data)
        .map_err(|e| Error::Setup(format!("cannot read or create the notify secret: {e}")))?;
    tasks.push(tokio::spawn(notify::run(
        stack.ports.clone(),
        Arc::new(notify_secret),
        stack.replies.clone(),
        stack.config.allow_private_notify,
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(intake::run(
        stack.ports.clone(),
        stack.templates.clone(),
        stack.replies.clone(),
        stop_rx.clone(),
    )));
    let dispatch = tokio::spawn(dispatch::dispatch(
        stack.ports.clone(),
        stack.compute.clone(),
        stop_rx.clone(),
    ));
    let chaos = stack
        .config
        .chaos
        .map(|mean| spawn_spot_chaos(stack.compute.clone(), mean, stack.config.notice));
    let server = {
        let app = app(stack.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        })
    };

    let _ = shutdown.wait_for(|s| *s).await;
    info!(
        "shutting down: no new VMs; running VMs are preempted so their jobs resume on the next start"
    );
    if let Some(c) = chaos {
        c.abort();
    }
    dispatch.abort();
    let running = stack.compute.running();
    let notice = stack.config.notice.min(Duration::from_secs(10));
    for vm in &running {
        stack.compute.preempt(&vm.id, Some(notice));
    }
    let deadline = tokio::time::Instant::now() + notice + Duration::from_secs(5);
    while !stack.compute.running().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the last reports (exits, terminations) reach the ledger.
    tokio::time::sleep(Duration::from_millis(500)).await;
    loops::drain_events(&stack.ports).await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    for t in tasks.drain(..) {
        t.abort();
    }
    info!("stopped");
    Ok(())
}
