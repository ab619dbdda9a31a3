//! Promotion codes: a customer redeems a code once across all their orders.
//!
//! The rule spans every order of a customer, so no order stream can check
//! it. It is a dynamic consistency boundary instead (see `es_core::dcb`):
//! redemptions are events tagged with the code and the customer, kept in the
//! code's stream `promotion-<code>`, and a redemption is appended only if no
//! event with both tags was appended since the decision read them. Two
//! orders racing with one code and one customer: one redeems, the other is
//! refused; other customers, or other codes, never conflict.

use std::sync::Arc;

use es_core::{
    DcbStore, Decision, DecisionError, DecisionRunner, DomainEvent, InvalidTag, Metadata, Query,
    QueryItem, StreamId, Tag,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{Error, Result};

/// The longest promotion code.
const MAX_CODE_LEN: usize = 32;

/// What happens to a code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum PromotionEvent {
    /// `customer` redeemed `code` with the order `order_id`.
    PromotionRedeemed {
        code: String,
        customer: String,
        order_id: Uuid,
    },
    /// The order was not placed: the redemption is void.
    PromotionReleased {
        code: String,
        customer: String,
        order_id: Uuid,
    },
}

impl PromotionEvent {
    fn parts(&self) -> (&str, &str) {
        match self {
            Self::PromotionRedeemed { code, customer, .. }
            | Self::PromotionReleased { code, customer, .. } => (code, customer),
        }
    }
}

/// The boundary of one code and one customer: its two tags.
fn boundary(code: &str, customer: &str) -> Result<[Tag; 2], InvalidTag> {
    Ok([Tag::of("promotion", code)?, Tag::of("customer", customer)?])
}

impl DomainEvent for PromotionEvent {
    const EVENT_TYPES: &'static [&'static str] = &["PromotionRedeemed", "PromotionReleased"];

    fn event_type(&self) -> &'static str {
        match self {
            Self::PromotionRedeemed { .. } => "PromotionRedeemed",
            Self::PromotionReleased { .. } => "PromotionReleased",
        }
    }

    fn tags(&self) -> Result<Vec<Tag>, InvalidTag> {
        let (code, customer) = self.parts();
        Ok(boundary(code, customer)?.into())
    }
}

/// Redeem (or give back) `code` for `customer`'s order.
struct Redemption<'a> {
    step: Step,
    code: &'a str,
    customer: &'a str,
    order_id: Uuid,
}

/// The code was redeemed by another order of the customer.
#[derive(Debug, thiserror::Error)]
#[error("promotion code already redeemed by order {0}")]
struct RedeemedBy(Uuid);

impl Decision for Redemption<'_> {
    type Event = PromotionEvent;
    /// The order that holds the redemption, if any.
    type State = Option<Uuid>;
    type Rejection = RedeemedBy;

    fn query(&self) -> Query {
        match boundary(self.code, self.customer) {
            Ok([code, customer]) => Query::from(
                QueryItem::tagged(code)
                    .and_tag(customer)
                    .of_types(PromotionEvent::EVENT_TYPES.iter().copied()),
            ),
            Err(_) => Query::none(),
        }
    }

    fn evolve(&self, holder: &mut Option<Uuid>, event: &PromotionEvent) {
        match event {
            PromotionEvent::PromotionRedeemed { order_id, .. } => *holder = Some(*order_id),
            PromotionEvent::PromotionReleased { order_id, .. } if *holder == Some(*order_id) => {
                *holder = None;
            }
            PromotionEvent::PromotionReleased { .. } => {}
        }
    }

    fn decide(&self, holder: &Option<Uuid>) -> Result<Vec<PromotionEvent>, RedeemedBy> {
        let (code, customer, order_id) = (self.code.into(), self.customer.into(), self.order_id);
        match (*holder, self.step) {
            // Redeemed by this order already (a retry): nothing more.
            (Some(holder), Step::Redeem) if holder == order_id => Ok(vec![]),
            (Some(holder), Step::Redeem) => Err(RedeemedBy(holder)),
            (None, Step::Redeem) => Ok(vec![PromotionEvent::PromotionRedeemed {
                code,
                customer,
                order_id,
            }]),
            (Some(holder), Step::Release) if holder == order_id => {
                Ok(vec![PromotionEvent::PromotionReleased {
                    code,
                    customer,
                    order_id,
                }])
            }
            (_, Step::Release) => Ok(vec![]),
        }
    }
}

/// What [`Promotions::decide`] does with a code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Redeem it for an order.
    Redeem,
    /// Give an order's redemption back.
    Release,
}

/// Redeems and releases promotion codes on a DCB store.
#[derive(Debug)]
pub(crate) struct Promotions {
    runner: DecisionRunner<PromotionEvent>,
}

impl Promotions {
    /// Redemptions decided on `store`, decoded through `schema`.
    pub(crate) fn new(store: Arc<dyn DcbStore>, schema: &es_core::Schema) -> Self {
        Self {
            runner: DecisionRunner::new(store).with_codec(schema.codec()),
        }
    }

    /// The code as it is kept: trimmed, upper case, 1 to 32 letters, digits
    /// and dashes.
    pub(crate) fn normalize(code: &str) -> Result<String> {
        let code = code.trim().to_uppercase();
        let valid = !code.is_empty()
            && code.len() <= MAX_CODE_LEN
            && code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if valid {
            Ok(code)
        } else {
            Err(Error::validation(
                "promotion_code",
                format!("1 to {MAX_CODE_LEN} letters, digits and dashes"),
            ))
        }
    }

    /// Redeems `code` for `customer`'s order `order_id` (once per customer,
    /// again for the same order, a retry; refused with
    /// [`Error::PromotionRedeemed`] for any other), or releases it: gives the
    /// redemption of `order_id` back (the order was refused), so that the
    /// customer can use the code again.
    pub(crate) async fn decide(
        &self,
        step: Step,
        code: &str,
        customer: &str,
        order_id: Uuid,
        metadata: &Metadata,
    ) -> Result<()> {
        let stream = StreamId::for_aggregate("promotion", code)
            .map_err(|e| Error::caused("promotion stream", e))?;
        let redemption = Redemption {
            step,
            code,
            customer,
            order_id,
        };
        match self
            .runner
            .execute(&stream, &redemption, metadata.clone())
            .await
        {
            Ok(_) => Ok(()),
            Err(DecisionError::Rejected(RedeemedBy(_))) => Err(Error::PromotionRedeemed {
                code: code.to_owned(),
            }),
            Err(e) => Err(Error::caused("promotion code", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use es_core::testing::DecisionFixture;

    use super::*;

    fn redeemed(order_id: Uuid) -> PromotionEvent {
        PromotionEvent::PromotionRedeemed {
            code: "SPRING".into(),
            customer: "ada@example.com".into(),
            order_id,
        }
    }

    fn redeem(order_id: Uuid, step: Step) -> Redemption<'static> {
        Redemption {
            step,
            code: "SPRING",
            customer: "ada@example.com",
            order_id,
        }
    }

    #[test]
    fn a_code_is_redeemed_once_per_customer() {
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        DecisionFixture::given([])
            .when(&redeem(first, Step::Redeem))
            .then_events([redeemed(first)]);
        DecisionFixture::given([redeemed(first)])
            .when(&redeem(second, Step::Redeem))
            .then_rejected(|e| e.0 == first);
        // A retry of the order that holds it changes nothing.
        DecisionFixture::given([redeemed(first)])
            .when(&redeem(first, Step::Redeem))
            .then_events([]);
    }

    #[test]
    fn a_released_code_can_be_redeemed_again_and_only_its_holder_releases_it() {
        let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
        let released = PromotionEvent::PromotionReleased {
            code: "SPRING".into(),
            customer: "ada@example.com".into(),
            order_id: first,
        };
        DecisionFixture::given([redeemed(first)])
            .when(&redeem(second, Step::Release))
            .then_events([]);
        DecisionFixture::given([redeemed(first)])
            .when(&redeem(first, Step::Release))
            .then_events([released.clone()]);
        DecisionFixture::given([redeemed(first), released])
            .when(&redeem(second, Step::Redeem))
            .then_events([redeemed(second)]);
    }

    #[test]
    fn another_customer_or_code_is_another_boundary() {
        let other_customer = PromotionEvent::PromotionRedeemed {
            code: "SPRING".into(),
            customer: "bob@example.com".into(),
            order_id: Uuid::now_v7(),
        };
        let other_code = PromotionEvent::PromotionRedeemed {
            code: "SUMMER".into(),
            customer: "ada@example.com".into(),
            order_id: Uuid::now_v7(),
        };
        let order = Uuid::now_v7();
        DecisionFixture::given([other_customer, other_code])
            .when(&redeem(order, Step::Redeem))
            .then_events([redeemed(order)]);
    }

    #[test]
    fn codes_are_kept_in_upper_case_and_checked() {
        assert_eq!(Promotions::normalize(" spring-10 ").unwrap(), "SPRING-10");
        for bad in ["", "has space", "x".repeat(33).as_str(), "emoji🙂"] {
            assert!(Promotions::normalize(bad).is_err(), "{bad:?}");
        }
    }
}
