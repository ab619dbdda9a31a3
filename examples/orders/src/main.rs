//! `orders`: the order-processing system in one process.
//!
//! ```text
//! cargo run -p orders                       # serve on 127.0.0.1:8080
//! cargo run -p orders -- --payment-timeout 2s --listen 127.0.0.1:9000
//! cargo run -p orders -- demo               # a table of outcomes
//! ORDERS_JWT_SECRET=s3cret cargo run -p orders                     # tokens required
//! ORDERS_JWT_SECRET=s3cret cargo run -p orders -- token --role admin
//! ```
//!
//! The load generator is its own binary, `orders-load` (package
//! `examples/orders-load`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use orders::{Config, System};

/// mimalloc, not the C library's allocator: an event is allocated on one
/// runtime worker and often freed on the other, and glibc's free then takes
/// the other thread's arena lock; workers slept on it thousands of times a
/// second. Built without transparent huge pages (`no_thp`): with them, each
/// purge of freed memory gave back parts of 2 MiB pages that the next
/// allocations faulted in and zeroed again, a third of all CPU time.
/// docs/src/operations.md ("Memory allocator") gives the figures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "orders",
    version,
    about = "The event-driven order-processing system, embedded in one process"
)]
struct Cli {
    /// Where to serve the HTTP API.
    #[arg(
        long,
        env = "ORDERS_LISTEN",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    listen: SocketAddr,
    /// How long payment may take once stock is reserved (e.g. 30s, 2s, 500ms).
    #[arg(long, env = "ORDERS_PAYMENT_TIMEOUT", default_value = "30s", value_parser = parse_duration, global = true)]
    payment_timeout: Duration,
    /// Log as JSON lines.
    #[arg(long, env = "ORDERS_LOG_JSON", global = true)]
    log_json: bool,
    #[command(flatten)]
    limits: orders::http::Limits,
    #[command(flatten)]
    auth: orders::auth::AuthArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API (the default). With `--services`, run those
    /// services of the distributed deployment over PostgreSQL, RabbitMQ and
    /// Redis instead of the embedded system.
    Serve(Box<orders::distributed::ServeArgs>),
    /// Place a handful of orders covering each path and print their outcomes.
    Demo,
    /// Publish the order store's order events again, into the query
    /// service's queue only: fills the replica of a query service that joined
    /// a deployment with older orders. Safe to run at any time.
    ReplayOrders(Box<orders::distributed::ServeArgs>),
    /// Apply the events the query service's read model parked (refused and
    /// set aside) again, after a fix, and print what became of them: applied
    /// once, or still parked with the new error. Safe while the query
    /// service runs.
    ReplayParked(Box<orders::distributed::ServeArgs>),
    /// Mint a bearer token signed with the HS256 secret
    /// (`--jwt-hs256-secret` / `ORDERS_JWT_SECRET`) and print it.
    Token(TokenArgs),
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// `admin` may do anything; `customer` only with their own orders.
    #[arg(long, value_parser = [orders::auth::ADMIN, orders::auth::CUSTOMER])]
    role: String,
    /// The customer's email (required for `customer`).
    #[arg(long)]
    email: Option<String>,
    /// How long the token is valid (e.g. 15m, 1h, 7d).
    #[arg(long, default_value = "1h", value_parser = orders::auth::parse_ttl)]
    ttl: Duration,
}

/// Parses `30s`, `500ms`, `2m` or a plain number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 30s, 500ms, 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("invalid duration unit {unit:?}: use ms, s or m")),
    };
    if !(0.001..=86_400.0).contains(&seconds) {
        return Err(format!("duration {s:?} out of range (1ms to 24h)"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let _log = orders::telemetry::init_tracing(cli.log_json, "info", &service_name(&cli.command));
    let result = match cli.command {
        None => serve(cli.listen, cli.limits, cli.payment_timeout, &cli.auth).await,
        Some(Command::Serve(args)) if args.services.is_none() => {
            serve(cli.listen, cli.limits, cli.payment_timeout, &cli.auth).await
        }
        Some(Command::Serve(mut args)) => {
            args.auth = cli.auth;
            orders::distributed::serve(*args, cli.listen, cli.limits, cli.payment_timeout).await
        }
        Some(Command::Token(args)) => token(&args, &cli.auth).map(|token| println!("{token}")),
        Some(Command::Demo) => demo(cli.payment_timeout).await,
        Some(Command::ReplayOrders(args)) => orders::distributed::replay_orders(&args)
            .await
            .map(|published| println!("{published} order events published to the query service")),
        Some(Command::ReplayParked(args)) => orders::distributed::replay_parked_events(&args)
            .await
            .map(|r| {
                println!(
                    "parked events: {} applied, {} skipped, {} still parked, {} missing",
                    r.applied, r.skipped, r.still_parked, r.missing
                );
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = error.chain(), "failed");
            ExitCode::FAILURE
        }
    }
}

/// The name this process exports its spans under: the services it runs
/// (`order`, `gateway`, `order+inventory`), or `orders` for the embedded
/// system.
fn service_name(command: &Option<Command>) -> String {
    match command {
        Some(Command::Serve(args)) => match args.services.as_deref() {
            Some(services) if !services.is_empty() => services.join("+"),
            _ => "orders".to_owned(),
        },
        _ => "orders".to_owned(),
    }
}

async fn demo(payment_timeout: Duration) -> orders::Result<()> {
    // The demo waits for timeouts: keep them short unless asked otherwise.
    let timeout = if payment_timeout == Duration::from_secs(30) {
        Duration::from_secs(1)
    } else {
        payment_timeout
    };
    let rows = orders::demo::run(timeout).await?;
    print!("{}", orders::demo::table(&rows));
    Ok(())
}

/// A token for `args.role`, signed with the configured HS256 secret.
fn token(args: &TokenArgs, auth: &orders::auth::AuthArgs) -> orders::Result<String> {
    let secret = auth.jwt_hs256_secret.as_deref().ok_or_else(|| {
        orders::Error::internal(
            "no secret to sign with: set --jwt-hs256-secret or ORDERS_JWT_SECRET",
        )
    })?;
    let email = match (args.role.as_str(), args.email.as_deref()) {
        (orders::auth::CUSTOMER, None) => {
            return Err(orders::Error::validation(
                "email",
                "a customer's token needs --email",
            ))
        }
        (_, Some(raw)) => Some(orders::order::validate_email(raw)?),
        (_, None) => None,
    };
    let mut claims = orders::auth::Claims::new(&args.role, email.as_deref(), args.ttl);
    claims.iss.clone_from(&auth.jwt_issuer);
    claims.aud.clone_from(&auth.jwt_audience);
    orders::auth::mint(secret, &claims)
}

async fn serve(
    listen: SocketAddr,
    limits: orders::http::Limits,
    payment_timeout: Duration,
    auth: &orders::auth::AuthArgs,
) -> orders::Result<()> {
    let authenticator = auth.authenticator()?;
    let open = authenticator.is_none();
    let system = System::embedded(Config {
        payment_timeout,
        auth: authenticator,
        ..Config::default()
    })
    .await?;
    let banner = |addr| {
        if open {
            tracing::warn!(
                "AUTHENTICATION IS OFF: anyone who reaches http://{addr} may do anything \
                 (fine for a local demo); set --jwt-hs256-secret (ORDERS_JWT_SECRET) or \
                 --jwt-rs256-public-key-file to require bearer tokens"
            );
        } else {
            tracing::info!(
                "bearer tokens required on /api; mint one with: orders token --role admin \
                 (or --role customer --email ada@example.com), then add \
                 -H 'authorization: Bearer <token>' to the requests below"
            );
        }
        tracing::info!(
        %addr,
        payment_timeout = ?payment_timeout,
        "orders is serving; try:\n\
         curl -s -X POST http://{addr}/api/products -H 'content-type: application/json' -d '{{\"name\":\"Widget\",\"price\":\"12.50\",\"stock\":10}}'\n\
         curl -s -X POST http://{addr}/api/orders -H 'content-type: application/json' -H 'Idempotency-Key: demo-1' -d '{{\"customer_email\":\"ada@example.com\",\"items\":[{{\"product_id\":\"<product_id>\",\"quantity\":2}}],\"payment\":{{\"card_token\":\"tok_ok\"}}}}'\n\
         curl -s 'http://{addr}/api/orders/<order_id>?min_position=<position>'\n\
         curl -s http://{addr}/api/orders/<order_id>/events\n\
         curl -s -X POST http://{addr}/api/orders/<order_id>/cancel -H 'content-type: application/json' -d '{{\"reason\":\"changed my mind\"}}'\n\
         curl -s 'http://{addr}/api/orders?customer_email=ada@example.com'   curl -s 'http://{addr}/api/orders/search?q=widget'   curl -s http://{addr}/api/stats\n\
         curl -s http://{addr}/openapi.json   curl -s http://{addr}/metrics   curl -s http://{addr}/health\n\
         card tokens: tok_ok, tok_decline, tok_timeout, tok_delay_<ms>"
        );
    };
    orders::http::serve(system.router(), listen, limits, banner).await?;
    system.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("0s").is_err());
    }
}
