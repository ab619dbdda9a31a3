//! The schema of the order system's stored events: every event enum the
//! services store, and the upcasters that read the versions earlier releases
//! wrote. [`Backends`](crate::Backends) builds it, and so checks it, before
//! any service starts; every repository, saga, feed and read model decodes
//! through a codec from it.
//!
//! Released changes, oldest first:
//!
//! - `OrderCreated` v2 names the time the order was placed `placed_at`
//!   (v1: `created_at`).
//!
//! The samples of every released version are in `tests/golden/`; the
//! `golden` test decodes them all through this schema.

use es_core::{Schema, SchemaError, Upcaster};

use crate::inventory::{ProductEvent, ReservationEvent};
use crate::order::promotion::PromotionEvent;
use crate::order::OrderEvent;
use crate::payment::PaymentEvent;
use crate::saga::OrderSagaEvent;

/// Builds the schema, checking that no two enums store the same name and
/// that every upcaster chain ends at a version the code reads.
///
/// # Errors
/// The first inconsistency found.
pub fn build() -> Result<Schema, SchemaError> {
    Schema::builder()
        .events::<OrderEvent>()
        .events::<OrderSagaEvent>()
        .events::<PromotionEvent>()
        .events::<ProductEvent>()
        .events::<ReservationEvent>()
        .events::<PaymentEvent>()
        .upcaster(Upcaster::new("OrderCreated", 1, |payload| {
            renamed(payload, "created_at", "placed_at")
        }))
        .build()
}

/// `payload` with its field `from` named `to`.
fn renamed(
    mut payload: serde_json::Value,
    from: &str,
    to: &str,
) -> Result<serde_json::Value, String> {
    let fields = payload
        .as_object_mut()
        .ok_or_else(|| format!("expected an object with {from}"))?;
    let value = fields
        .remove(from)
        .ok_or_else(|| format!("no field {from}"))?;
    fields.insert(to.to_owned(), value);
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_core::testing::GoldenCorpus;
    use es_core::{DomainEvent, Payload};

    use crate::messages::*;
    use crate::saga::{Advanced, Fact, SagaStarted};
    use crate::Money;

    #[test]
    fn the_schema_is_consistent() {
        let schema = build().unwrap();
        let names: Vec<_> = schema.event_types().map(|(name, _)| name).collect();
        assert!(names.contains(&"OrderCreated") && names.contains(&"Advanced"));
    }

    #[test]
    fn a_v1_order_created_reads_its_created_at_as_placed_at() {
        let v1 = Payload::from_json(
            r#"{"order_id":"00000000-0000-0000-0000-000000000001","customer_email":"a@b.c","items":[],"total":"0.00","card_token":"tok","payment_timeout_ms":1000,"created_at":"2026-01-02T03:04:05Z"}"#,
        )
        .unwrap();
        let OrderEvent::OrderCreated(created) = build()
            .unwrap()
            .codec::<OrderEvent>()
            .decode_parts("OrderCreated", 1, &v1)
            .unwrap()
        else {
            panic!("not an OrderCreated");
        };
        assert_eq!(created.placed_at.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        let refused = renamed(serde_json::json!({ "other": 1 }), "created_at", "placed_at");
        assert_eq!(refused.unwrap_err(), "no field created_at");
    }

    /// Every released `(type, version)` of every stored enum decodes
    /// through today's schema, and today's versions all have a sample.
    #[test]
    fn the_golden_corpus_decodes() {
        let schema = build().unwrap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
        check(&schema, &dir.join("order"), &order_events());
        check(&schema, &dir.join("order_saga"), &saga_events());
        check(&schema, &dir.join("promotion"), &promotion_events());
        check(&schema, &dir.join("product"), &product_events());
        check(&schema, &dir.join("reservation"), &reservation_events());
        check(&schema, &dir.join("payment"), &payment_events());
    }

    fn check<E: DomainEvent>(schema: &Schema, dir: &std::path::Path, current: &[E]) {
        let report = GoldenCorpus::at(dir)
            .check(&schema.codec::<E>(), current)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(report.decoded.len() + report.recorded.len() >= E::EVENT_TYPES.len());
    }

    fn id(n: u128) -> uuid::Uuid {
        uuid::Uuid::from_u128(n)
    }

    fn at() -> chrono::DateTime<chrono::Utc> {
        "2026-12-07T10:00:00Z".parse().unwrap()
    }

    fn order_events() -> Vec<OrderEvent> {
        vec![
            OrderEvent::OrderCreated(OrderCreated {
                order_id: id(1),
                customer_email: "ann@example.com".into(),
                items: vec![OrderLine {
                    product_id: id(2),
                    product_name: "Kettle".into(),
                    unit_price: Money::from_minor(2_500),
                    quantity: 2,
                }],
                total: Money::from_minor(5_000),
                card_token: "tok_visa".into(),
                payment_timeout_ms: 30_000,
                placed_at: at(),
            }),
            OrderEvent::OrderInventoryConfirmed(OrderInventoryConfirmed { order_id: id(1) }),
            OrderEvent::OrderPaymentConfirmed(OrderPaymentConfirmed {
                order_id: id(1),
                transaction_id: "txn-1".into(),
            }),
            OrderEvent::OrderCompleted(OrderCompleted {
                order_id: id(1),
                customer_email: "ann@example.com".into(),
                completed_at: at(),
            }),
            OrderEvent::OrderCancelled(OrderCancelled {
                order_id: id(1),
                customer_email: "ann@example.com".into(),
                reason: "payment declined".into(),
                by_customer: false,
                cancelled_at: at(),
            }),
        ]
    }

    fn saga_events() -> Vec<OrderSagaEvent> {
        vec![OrderSagaEvent::Advanced(Advanced {
            learnt: Some(Fact::Started(SagaStarted {
                order_id: id(1),
                customer_email: "ann@example.com".into(),
                lines: vec![StockLine {
                    product_id: id(2),
                    quantity: 2,
                }],
                total: Money::from_minor(5_000),
                card_token: "tok_visa".into(),
                payment_timeout_ms: 30_000,
            })),
            issued: Vec::new(),
        })]
    }

    fn promotion_events() -> Vec<PromotionEvent> {
        let (code, customer) = ("WELCOME".to_owned(), "ann@example.com".to_owned());
        vec![
            PromotionEvent::PromotionRedeemed {
                code: code.clone(),
                customer: customer.clone(),
                order_id: id(1),
            },
            PromotionEvent::PromotionReleased {
                code,
                customer,
                order_id: id(1),
            },
        ]
    }

    fn product_events() -> Vec<ProductEvent> {
        let stock = |quantity| (id(2), id(1), quantity);
        let (product_id, order_id, quantity) = stock(2);
        vec![
            ProductEvent::ProductCreated(ProductCreated {
                product_id,
                name: "Kettle".into(),
                price: Money::from_minor(2_500),
                stock: 10,
            }),
            ProductEvent::ProductRestocked(ProductRestocked {
                product_id,
                quantity: 5,
            }),
            ProductEvent::StockReserved(StockReserved {
                product_id,
                order_id,
                quantity,
            }),
            ProductEvent::StockReleased(StockReleased {
                product_id,
                order_id,
                quantity,
            }),
            ProductEvent::StockCommitted(StockCommitted {
                product_id,
                order_id,
                quantity,
            }),
        ]
    }

    fn reservation_events() -> Vec<ReservationEvent> {
        vec![
            ReservationEvent::InventoryReserved(InventoryReserved {
                order_id: id(1),
                lines: vec![StockLine {
                    product_id: id(2),
                    quantity: 2,
                }],
            }),
            ReservationEvent::InventoryReservationFailed(InventoryReservationFailed {
                order_id: id(1),
                reason: "out of stock".into(),
            }),
            ReservationEvent::InventoryReleased(InventoryReleased { order_id: id(1) }),
            ReservationEvent::InventoryCommitted(InventoryCommitted { order_id: id(1) }),
        ]
    }

    fn payment_events() -> Vec<PaymentEvent> {
        vec![
            PaymentEvent::PaymentSucceeded(PaymentSucceeded {
                order_id: id(1),
                transaction_id: "txn-1".into(),
                amount: Money::from_minor(5_000),
            }),
            PaymentEvent::PaymentDeclined(PaymentDeclined {
                order_id: id(1),
                reason: "card declined".into(),
            }),
            PaymentEvent::PaymentRefunded(PaymentRefunded {
                order_id: id(1),
                transaction_id: "txn-1".into(),
                amount: Money::from_minor(5_000),
            }),
        ]
    }
}
