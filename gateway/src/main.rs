use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's allocator: allocation was a large share of the CPU profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "gateway",
    about = "The wallet's HTTP gateway and admin commands"
)]
struct Cli {
    #[command(flatten)]
    config: gateway::GatewayConfig,
    #[command(subcommand)]
    command: Option<AdminCommand>,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Serve HTTP (the default).
    Serve,
    /// Check every invariant of the books, print the report as JSON, exit 1 when any fails.
    Audit,
    /// Manage API keys for game backends.
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
    /// Give a player the admin role.
    PromoteAdmin {
        /// The player's username.
        username: String,
    },
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    /// Create a key and print it once; only its hash is stored.
    Create {
        /// A name to recognise the key by (the game backend using it).
        #[arg(long)]
        name: String,
        /// Scopes: wallet:credit, wallet:debit, wallet:read, catalog:write, admin. Repeat or
        /// separate with commas.
        #[arg(long = "scope", value_delimiter = ',', required = true)]
        scopes: Vec<String>,
    },
    /// Revoke a key by its id (effective within 10 s on every gateway).
    Revoke { id: uuid::Uuid },
    /// List keys (never their secrets).
    List,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    shared::telemetry::init(&cli.config.common.log_format);
    match cli.command.unwrap_or(AdminCommand::Serve) {
        AdminCommand::Serve => {
            let shutdown = CancellationToken::new();
            tokio::spawn(shared::shutdown::on_signal(shutdown.clone()));
            gateway::run(cli.config, shutdown).await
        }
        AdminCommand::Audit => {
            let pool = shared::db::bootstrap(&cli.config.common)
                .await
                .context("connecting to the database")?;
            let report = shared::audit::run(&pool)
                .await
                .context("running the audit")?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.passed {
                std::process::exit(1);
            }
            Ok(())
        }
        AdminCommand::ApiKey(command) => {
            let pool = shared::db::bootstrap(&cli.config.common)
                .await
                .context("connecting to the database")?;
            match command {
                ApiKeyCommand::Create { name, scopes } => {
                    let (id, key) = gateway::api_keys::create(&pool, &name, &scopes).await?;
                    println!("id:  {id}\nkey: {key}\nStore the key now: it is not shown again.");
                }
                ApiKeyCommand::Revoke { id } => {
                    anyhow::ensure!(
                        gateway::api_keys::revoke(&pool, id).await?,
                        "no active key has the id {id}"
                    );
                    println!("revoked {id}");
                }
                ApiKeyCommand::List => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&gateway::api_keys::list(&pool).await?)?
                    );
                }
            }
            Ok(())
        }
        AdminCommand::PromoteAdmin { username } => {
            let pool = shared::db::bootstrap(&cli.config.common)
                .await
                .context("connecting to the database")?;
            let updated =
                sqlx::query("UPDATE users SET role = 'admin' WHERE lower(username) = lower($1)")
                    .bind(&username)
                    .execute(&pool)
                    .await?
                    .rows_affected();
            anyhow::ensure!(updated == 1, "no player is named {username}");
            println!("{username} is now an admin");
            Ok(())
        }
    }
}
