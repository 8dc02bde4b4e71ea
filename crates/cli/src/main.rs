//! `respawn`: the command line of the respawn job broker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod client;
mod commands;
mod demo;
mod up;
mod validate;

/// Train on preemptible GPUs without losing a job.
#[derive(Debug, Parser)]
#[command(name = "respawn", version, about)]
struct Cli {
    /// The broker's API (`respawn up` serves it).
    #[arg(
        long,
        global = true,
        env = "RESPAWN_ENDPOINT",
        default_value = "http://127.0.0.1:7878"
    )]
    endpoint: String,
    /// API token (default: the local data folder's admin token, then ~/.config/respawn/token).
    #[arg(long, global = true, env = "RESPAWN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The local data folder: store, bucket (`<data>/bucket`), VMs, admin token
    /// [default: `.respawn` in this folder or the nearest parent folder that has one].
    #[arg(long, global = true)]
    data: Option<PathBuf>,
    /// `table` for people, `json` for scripts.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Output,
    /// The log's format on stderr: `human`, or `json` lines with `trace_id` and
    /// `span_id` (traces are exported as OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set).
    #[arg(long, global = true, value_enum, default_value = "human")]
    log_format: respawn_telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// A folder of trigger rules (YAML/JSON); default `<data>/triggers` if it exists.
    #[arg(long)]
    triggers: Option<PathBuf>,
    /// A webhooks file (YAML/JSON); default `<data>/hooks.yaml` if it exists.
    #[arg(long)]
    hooks: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:7878")]
    listen: SocketAddr,
    /// CPU slots (local VMs for jobs that need no GPU).
    #[arg(long, default_value_t = 4)]
    slots: usize,
    /// Notice the spot simulator gives before reclaiming a VM.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    notice: std::time::Duration,
    /// Preempt random VMs, on average this often (e.g. 30s). Off by default.
    #[arg(long, value_parser = humantime::parse_duration)]
    chaos: Option<std::time::Duration>,
    /// Run the broker's queues on RabbitMQ (amqp://user:pass@host:5672/%2f) instead of
    /// the local store; also consumes job submissions from `<prefix>submit`.
    #[arg(long, env = "RESPAWN_QUEUE_URL", hide_env_values = true)]
    queue: Option<String>,
    /// Prefix of the broker's queue names.
    #[arg(long, default_value = "respawn.")]
    queue_prefix: String,
    /// A folder of job templates for queue submissions (`{"template": NAME, "params": …}`).
    #[arg(long)]
    templates: Option<PathBuf>,
    /// Seconds between agent heartbeats.
    #[arg(long, default_value_t = 2)]
    heartbeat_secs: u64,
    /// How workloads are isolated: `auto` sandboxes them where bubblewrap works (and
    /// otherwise runs only the local admin's jobs), `sandbox` requires it, `none`
    /// runs them unsandboxed and allows tokens for others anyway.
    #[arg(long, value_enum, default_value = "auto")]
    isolation: up::Isolation,
    /// Let notify URLs reach loopback, link-local and private addresses (local
    /// development; refused otherwise).
    #[arg(long)]
    allow_private_notify: bool,
    /// A pool of VMs that run job after job instead of one VM per attempt
    /// (repeatable): NAME[:max=N,min=N,idle=60s,gpus=N,gpu=MODEL,on-demand,single-use]. Jobs
    /// name one in `placement.pool` or run in the first whose VMs fit them.
    #[arg(long = "pool", value_name = "POOL")]
    pools: Vec<respawn_core::pool::PoolSpec>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole broker locally: bucket folder, durable queue and ledger, local VMs, API.
    Up(UpArgs),
    /// Start a fresh local stack, drop a CSV into its bucket, preempt the training
    /// job twice, and show it resume to the final model.
    Demo {
        /// A folder for the demo's data (emptied first).
        #[arg(long, default_value = ".respawn/demo")]
        data: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7879")]
        listen: SocketAddr,
    },
    /// Submit a job spec, or a sweep (a spec template with `grid` or `list`), YAML or JSON.
    Submit {
        file: PathBuf,
        /// Show progress until the job ends; exit 0 if it succeeded, 1 otherwise.
        #[arg(long)]
        wait: bool,
    },
    /// List jobs.
    Jobs {
        #[arg(long)]
        state: Option<String>,
        /// key=value
        #[arg(long)]
        label: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Show one sweep (array job) and its progress.
        #[arg(long)]
        array: Option<String>,
    },
    /// A job with its attempt history.
    Show { id: String },
    /// The broker at a glance: jobs and VMs by state, the last preemptions and the
    /// work each lost, GPU hours on spot and the saving (an admin token of the
    /// default project).
    Status,
    /// API tokens of your project (the stack owner: of any project).
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// A job's output; `-f` follows it across attempts until the job ends.
    Logs {
        id: String,
        #[arg(short, long)]
        follow: bool,
        #[arg(long)]
        attempt: Option<u32>,
        #[arg(long)]
        stderr: bool,
    },
    /// Cancel a job.
    Cancel { id: String },
    /// Preempt a job's VM (or a VM by id) through the spot simulator.
    Preempt {
        target: String,
        /// Notice before the VM is reclaimed (default: the stack's `--notice`).
        #[arg(long, value_parser = humantime::parse_duration)]
        notice: Option<std::time::Duration>,
    },
    /// Check job spec files offline; print every problem with its field path.
    Validate {
        /// Spec files (YAML, or JSON when named *.json).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print the parsed spec (secrets redacted) as JSON.
        #[arg(long)]
        print: bool,
    },
    /// Print the JSON Schemas generated from respawn's types, or write them to a folder.
    Schema {
        /// Write each schema into this folder instead of printing the job spec schema.
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum TokenAction {
    /// Mint a token; its secret is shown once.
    Create {
        name: String,
        /// Comma-separated: submit, read, cancel, admin.
        #[arg(long, value_delimiter = ',', default_value = "submit,read")]
        scopes: Vec<String>,
        /// The project the token is for (default: your token's). Only the stack
        /// owner (an admin of the default project) mints for other projects.
        #[arg(long)]
        project: Option<String>,
    },
    List {
        /// Only this project's tokens (the stack owner sees every project by default).
        #[arg(long)]
        project: Option<String>,
    },
    Revoke {
        id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let telemetry = match cli.command {
        Command::Validate { files, print } => return validate::run(&files, print),
        Command::Schema { write } => return schema(write),
        // The demo logs to a file in its data folder, once it has one.
        Command::Demo { .. } => respawn_telemetry::Telemetry::default(),
        _ => respawn_telemetry::init("respawn", cli.log_format),
    };
    let code = run(cli);
    // The spans of the last moments, before the process ends.
    telemetry.shutdown();
    code
}

fn run(cli: Cli) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let data = match cli.data.clone() {
        Some(d) => d,
        None => client::find_data_folder(),
    };
    let data = match std::path::absolute(&data) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: cannot resolve {}: {e}", data.display());
            return ExitCode::FAILURE;
        }
    };
    let token = client::resolve_token(cli.token.clone(), &data);
    let client = client::Client::new(&cli.endpoint, token, &data);
    let out = cli.output;
    let result = rt.block_on(async move {
        match cli.command {
            Command::Up(a) => up_command(a, data).await,
            Command::Demo { data, listen } => demo::run(data, listen).await,
            Command::Submit { file, wait } => commands::submit(&client, &file, wait, out).await,
            Command::Jobs {
                array: Some(array), ..
            } => commands::array(&client, &array, out).await,
            Command::Jobs {
                state,
                label,
                limit,
                array: None,
            } => commands::jobs(&client, state, label, limit, out).await,
            Command::Show { id } => commands::show(&client, &id, out).await,
            Command::Status => commands::status(&client, out).await,
            Command::Token { action } => commands::token(&client, action, out).await,
            Command::Logs {
                id,
                follow,
                attempt,
                stderr,
            } => commands::logs(&client, &id, follow, attempt, stderr).await,
            Command::Cancel { id } => commands::cancel(&client, &id).await,
            Command::Preempt { target, notice } => {
                commands::preempt(&client, &target, notice).await
            }
            Command::Validate { .. } | Command::Schema { .. } => Ok(ExitCode::SUCCESS),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn up_command(a: UpArgs, data: PathBuf) -> Result<ExitCode, String> {
    let triggers = a
        .triggers
        .or_else(|| Some(data.join("triggers")).filter(|p| p.is_dir()));
    let hooks = a
        .hooks
        .or_else(|| Some(data.join("hooks.yaml")).filter(|p| p.is_file()));
    let data_templates = data.join("templates");
    let mut names = std::collections::BTreeSet::new();
    if let Some(p) = a.pools.iter().find(|p| !names.insert(p.name.clone())) {
        return Err(format!("--pool {}: two pools of that name", p.name));
    }
    let config = up::UpConfig {
        data,
        triggers,
        hooks,
        listen: a.listen,
        cpu_slots: a.slots,
        notice: a.notice,
        chaos: a.chaos,
        heartbeat_secs: a.heartbeat_secs,
        queue_url: a.queue,
        queue_prefix: a.queue_prefix,
        templates: a
            .templates
            .or_else(|| Some(data_templates).filter(|p| p.is_dir())),
        isolation: a.isolation,
        allow_private_notify: a.allow_private_notify,
        pools: a.pools,
    };
    let stack = up::open(config).await.map_err(|e| e.to_string())?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = tx.send(true);
    });
    up::run(stack, rx).await.map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

fn schema(write: Option<PathBuf>) -> ExitCode {
    let Some(dir) = write else {
        print!("{}", respawn_core::schema::job_spec());
        return ExitCode::SUCCESS;
    };
    for (name, text) in respawn_core::schema::all() {
        let path = dir.join(name);
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
