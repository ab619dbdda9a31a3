//! Passwords in connection URLs never reach the logs or `--help`: the
//! `orders` binary is started against servers that do not answer, with
//! passwords in every URL, and what it wrote while retrying is searched.

#![allow(clippy::unwrap_used)] // A panic is the report.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// Runs `orders` with `args` and `env` for `for_how_long`, then stops it; what
/// it wrote to stdout and stderr.
async fn output_of(args: &[&str], env: &[(&str, &str)], for_how_long: Duration) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_orders"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let _ = tokio::time::timeout(for_how_long, child.wait()).await;
    let _ = child.kill().await;
    let (mut stdout, mut stderr) = (String::new(), String::new());
    out.read_to_string(&mut stdout).await.unwrap();
    err.read_to_string(&mut stderr).await.unwrap();
    stdout + &stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_reaches_the_logs_or_the_help() {
    let secrets = [
        (
            "DATABASE_URL",
            "postgres://app:s3cr3t-pg@127.0.0.1:9/orders",
        ),
        ("REDIS_URL", "redis://:s3cr3t-redis@127.0.0.1:9"),
        ("ORDERS_NAMESPACE", "tsecrets"),
    ];
    // The broker does not answer: the process retries it, logging why.
    let mut env = secrets.to_vec();
    env.push(("AMQP_URL", "amqp://app:s3cr3t-amqp@127.0.0.1:9/%2f"));
    let broker_down = output_of(
        &["serve", "--services", "order,query"],
        &env,
        Duration::from_secs(3),
    )
    .await;
    assert!(broker_down.contains("not ready yet"), "{broker_down}");
    assert!(broker_down.contains("app:***@"), "{broker_down}");

    // The broker answers and PostgreSQL does not: the PostgreSQL retries.
    let amqp = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let mut env = secrets.to_vec();
    env.push(("AMQP_URL", &amqp));
    let database_down = output_of(
        &["serve", "--services", "order,query"],
        &env,
        Duration::from_secs(8),
    )
    .await;
    assert!(
        database_down.contains("PostgreSQL") && database_down.contains("not ready yet"),
        "{database_down}"
    );

    // A URL that does not parse is refused without being repeated.
    let mut env = secrets.to_vec();
    env.retain(|(k, _)| *k != "DATABASE_URL");
    env.push((
        "DATABASE_URL",
        "postgres://app:s3cr3t-pg@[not-a-host/orders",
    ));
    env.push(("AMQP_URL", &amqp));
    let malformed = output_of(
        &["serve", "--services", "order"],
        &env,
        Duration::from_secs(4),
    )
    .await;
    assert!(malformed.contains("invalid database URL"), "{malformed}");

    // The help shows no default or environment value with a password.
    let help = output_of(&["serve", "--help"], &env, Duration::from_secs(4)).await;
    assert!(help.contains("--amqp-url"), "{help}");
    assert!(!help.contains("guest:guest"), "{help}");

    for (what, text) in [
        ("broker down", &broker_down),
        ("database down", &database_down),
        ("malformed URL", &malformed),
        ("help", &help),
    ] {
        assert!(
            !text.contains("s3cr3t"),
            "{what}: a password was shown:\n{text}"
        );
    }
}
