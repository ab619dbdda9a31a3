//! `orders demo`: places a handful of orders covering success and each
//! failure path and prints a table of their outcomes.

use std::time::Duration;

use uuid::Uuid;

use crate::order::{OrderItemRequest, OrderStatus, PaymentRequest, PlaceOrderRequest};
use crate::payment::PaymentState;
use crate::query::OrderQueries;
use crate::{Config, Result, System};

/// One row of the demo's table.
#[derive(Clone, Debug)]
pub struct DemoRow {
    /// What the scenario shows.
    pub scenario: &'static str,
    /// The order.
    pub order_id: Uuid,
    /// Its final status.
    pub status: Option<OrderStatus>,
    /// Why it was cancelled.
    pub reason: Option<String>,
    /// Its payment at the end.
    pub payment: &'static str,
    /// Notifications sent.
    pub notifications: Vec<String>,
}

fn payment_label(state: &PaymentState) -> &'static str {
    match state {
        PaymentState::None => "none",
        PaymentState::Authorised { .. } => "charged",
        PaymentState::Declined => "declined",
        PaymentState::Refunded => "refunded",
    }
}

/// Runs the scenarios on an embedded system whose payment deadline is
/// `payment_timeout`, and returns one row per order.
pub async fn run(payment_timeout: Duration) -> Result<Vec<DemoRow>> {
    let system = System::embedded(Config {
        payment_timeout,
        ..Config::default()
    })
    .await?;
    let widget = system
        .inventory
        .create_product("Widget", "12.50", 10)
        .await?;
    let gadget = system.inventory.create_product("Gadget", "3.20", 1).await?;
    for id in [widget, gadget] {
        system
            .orders
            .catalog()
            .get_or_wait(id, Duration::from_secs(5))
            .await;
    }
    let late = format!("tok_delay_{}", payment_timeout.as_millis() + 500);
    let scenarios: Vec<(&'static str, Uuid, i64, String, bool)> = vec![
        ("happy path", widget, 2, "tok_ok".into(), false),
        ("out of stock", gadget, 5, "tok_ok".into(), false),
        ("card declined", widget, 1, "tok_decline".into(), false),
        ("payment timeout", widget, 1, "tok_timeout".into(), false),
        ("customer cancels", widget, 1, "tok_timeout".into(), true),
        ("late payment refunded", widget, 1, late, false),
    ];
    let mut placed = Vec::new();
    for (scenario, product, quantity, token, cancel) in scenarios {
        let request = PlaceOrderRequest {
            promotion_code: None,
            customer_email: "demo@example.com".into(),
            items: vec![OrderItemRequest {
                product_id: product,
                quantity,
            }],
            payment: PaymentRequest { card_token: token },
        };
        let order = system.orders.place_order(request, None).await?;
        if cancel {
            system.query.wait_for_position(order.position).await?;
            system
                .orders
                .cancel_order(order.order_id, "changed my mind".into())
                .await?;
        }
        placed.push((scenario, order.order_id));
    }
    let patience = payment_timeout * 2 + Duration::from_secs(5);
    let mut rows = Vec::new();
    for (scenario, order_id) in placed {
        let status = system.query.terminal_status(order_id, patience).await;
        rows.push((scenario, order_id, status));
    }
    // Let compensations (refunds, releases, notifications) finish.
    tokio::time::sleep(payment_timeout.min(Duration::from_secs(2)) + Duration::from_millis(700))
        .await;
    let mut out = Vec::new();
    for (scenario, order_id, status) in rows {
        let view = system.query.order(order_id, None).await.ok();
        let payment = system.payments.payment(order_id).await?;
        out.push(DemoRow {
            scenario,
            order_id,
            status,
            reason: view.and_then(|v| v.cancellation_reason),
            payment: payment_label(&payment.state),
            notifications: system
                .sent
                .for_order(order_id)
                .into_iter()
                .map(|n| n.kind.as_str().to_owned())
                .collect(),
        });
    }
    let stock = system.inventory.product(widget).await?;
    tracing::info!(
        available = stock.available,
        reserved = stock.reserved,
        "widget stock after the demo"
    );
    system.shutdown().await;
    Ok(out)
}

/// Formats the rows as a table.
pub fn table(rows: &[DemoRow]) -> String {
    let mut out = format!(
        "{:<22} {:<36} {:<10} {:<9} {:<16} {}\n",
        "scenario", "order", "status", "payment", "notified", "reason"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<22} {:<36} {:<10} {:<9} {:<16} {}\n",
            r.scenario,
            r.order_id,
            r.status.map_or("(running)", OrderStatus::as_str),
            r.payment,
            r.notifications.join(","),
            r.reason.as_deref().unwrap_or("")
        ));
    }
    out
}
