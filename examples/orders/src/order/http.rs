//! The order service's HTTP surface.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use super::{OrderItemRequest, OrderService, PaymentRequest, PlaceOrderRequest, PlacedOrder};
use crate::auth::Caller;
use crate::http::{parse_id, ApiError, ApiJson, ErrorBody};

/// The order service's OpenAPI document.
#[derive(Debug, OpenApi)]
#[openapi(
    paths(place_order, cancel_order),
    components(schemas(PlaceOrderRequest, OrderItemRequest, PaymentRequest, PlacedOrder, CancelRequest, Cancelled, ErrorBody)),
    tags((name = "orders", description = "Placing and cancelling orders"))
)]
pub(crate) struct OrderApi;

/// The order service's routes: `POST /api/orders`, `POST /api/orders/{id}/cancel`.
pub fn router(service: Arc<OrderService>) -> Router {
    Router::new()
        .route("/api/orders", post(place_order))
        .route("/api/orders/{id}/cancel", post(cancel_order))
        .with_state(service)
}

/// Places an order. Prices come from the catalog; the saga takes it from
/// there. With `Idempotency-Key`, the same key and body answer the first
/// answer again; the same key with another body is 422. A customer places
/// orders in their own email only (403 otherwise).
#[utoipa::path(
    post, path = "/api/orders", tag = "orders",
    request_body = PlaceOrderRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the request idempotent")),
    responses(
        (status = 202, description = "Accepted: the order is Pending", body = PlacedOrder),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Another customer's email", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Invalid order, unknown product, or idempotency key reused", body = ErrorBody),
    )
)]
async fn place_order(
    State(service): State<Arc<OrderService>>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(request): ApiJson<PlaceOrderRequest>,
) -> Result<(StatusCode, Json<PlacedOrder>), ApiError> {
    // An invalid email is the service's 422; a valid one must be the caller's.
    if let Ok(email) = super::validate_email(&request.customer_email) {
        caller.may_act_for(&email)?;
    }
    let key = match headers.get("idempotency-key") {
        Some(v) => Some(v.to_str().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_header",
                "Idempotency-Key must be visible ASCII",
            )
        })?),
        None => None,
    };
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let placed = service
        .place_order_traced(request, key, traceparent)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(placed)))
}

/// A customer's cancellation.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelRequest {
    /// Why the customer cancels (optional).
    #[serde(default)]
    pub reason: String,
}

/// The answer to a cancellation.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Cancelled {
    /// The order.
    pub order_id: Uuid,
    /// `Cancelled`.
    pub status: String,
    /// The store position of the cancellation.
    pub position: String,
}

/// Cancels an order before it completes; stock is released and any payment
/// refunded asynchronously. 409 when it is completed or already cancelled;
/// 403 when a customer asks for another customer's order.
#[utoipa::path(
    post, path = "/api/orders/{id}/cancel", tag = "orders",
    params(("id" = Uuid, Path, description = "The order")),
    request_body = CancelRequest,
    responses(
        (status = 200, description = "Cancelled", body = Cancelled),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Another customer's order", body = ErrorBody),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 409, description = "Completed or already cancelled", body = ErrorBody),
    )
)]
async fn cancel_order(
    State(service): State<Arc<OrderService>>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Cancelled>, ApiError> {
    let order_id = parse_id("order", &id)?;
    // The body is optional: no body cancels with a default reason.
    let request: CancelRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CancelRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            let status = if e.is_data() {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::BAD_REQUEST
            };
            ApiError::new(status, "invalid_body", e.to_string())
        })?
    };
    let position = service
        .cancel_order_for(order_id, request.reason, caller.customer())
        .await?;
    Ok(Json(Cancelled {
        order_id,
        status: "Cancelled".into(),
        position: position.to_string(),
    }))
}
