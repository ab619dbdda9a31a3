//! The query service's HTTP surface.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use es_core::Position;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::{
    decode_cursor, HistoryEvent, OrderItemView, OrderPage, OrderQueries, OrderView, Stats,
    StatusStats,
};
use crate::auth::Caller;
use crate::http::{parse_id, ApiError, ApiQuery, ErrorBody};
use crate::order::{validate_email, OrderStatus};

/// The query service's OpenAPI document.
#[derive(Debug, OpenApi)]
#[openapi(
    paths(get_order, list_orders, search_orders, order_events, stats, parked_events, replay_parked),
    components(schemas(OrderView, OrderItemView, OrderPage, SearchResult, HistoryEvent, Stats, StatusStats, ErrorBody, ParkedView, ReplayView)),
    tags((name = "queries", description = "Read models of orders"))
)]
pub(crate) struct QueryApi;

/// The query routes over either read model: `GET /api/orders`,
/// `/api/orders/search`, `/api/orders/{id}`, `/api/orders/{id}/events`,
/// `/api/stats`, and the read model's parked events: `GET
/// /api/admin/read-model/parked`, `POST /api/admin/read-model/parked/replay`.
pub fn router(service: Arc<dyn OrderQueries>) -> Router {
    Router::new()
        .route("/api/orders", get(list_orders))
        .route("/api/orders/search", get(search_orders))
        .route("/api/orders/{id}", get(get_order))
        .route("/api/orders/{id}/events", get(order_events))
        .route("/api/stats", get(stats))
        .route("/api/admin/read-model/parked", get(parked_events))
        .route("/api/admin/read-model/parked/replay", post(replay_parked))
        .with_state(service)
}

/// A 400 for an invalid query parameter.
pub(crate) fn bad(field: &str, message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        body: ErrorBody {
            code: "invalid_query",
            message: message.into(),
            field: Some(field.to_owned()),
        },
    }
}

/// Read-your-writes and long-poll options.
#[derive(Debug, Default, Deserialize, IntoParams)]
pub(crate) struct GetOrderParams {
    /// Wait (at most 10 s) until the read model has reached this store
    /// position (as returned by `POST /api/orders`).
    pub min_position: Option<String>,
    /// Wait up to this many milliseconds (at most 10,000) for the order to
    /// reach a terminal status before answering.
    pub wait_terminal_ms: Option<u64>,
}

/// One order. A customer reads only their own (403 otherwise).
#[utoipa::path(
    get, path = "/api/orders/{id}", tag = "queries",
    params(("id" = uuid::Uuid, Path, description = "The order"), GetOrderParams),
    responses(
        (status = 200, description = "The order", body = OrderView),
        (status = 400, description = "Invalid min_position", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Another customer's order", body = ErrorBody),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 422, description = "min_position past every write", body = ErrorBody),
        (status = 503, description = "The read model did not reach min_position within 10 s", body = ErrorBody),
    )
)]
async fn get_order(
    State(service): State<Arc<dyn OrderQueries>>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<GetOrderParams>,
) -> Result<Json<OrderView>, ApiError> {
    let view = get_order_view(service.as_ref(), &id, params).await?;
    caller.may_act_for(&view.customer_email)?;
    Ok(Json(view))
}

async fn get_order_view(
    service: &dyn OrderQueries,
    id: &str,
    params: GetOrderParams,
) -> Result<OrderView, ApiError> {
    let order_id = parse_id("order", id)?;
    let min_position = params
        .min_position
        .as_deref()
        .map(str::parse::<Position>)
        .transpose()
        .map_err(|e| bad("min_position", e.to_string()))?;
    if let Some(ms) = params.wait_terminal_ms {
        if let Some(p) = min_position {
            service.wait_for(order_id, p).await?;
        }
        let timeout = Duration::from_millis(ms.min(10_000));
        // The read that saw the order terminal answers; else the order now.
        return match service.wait_terminal(order_id, timeout).await {
            Some(view) => Ok(view),
            None => Ok(service.fresh(order_id).await?),
        };
    }
    Ok(service.order(order_id, min_position).await?)
}

/// Filters and paging of the order list.
#[derive(Debug, Default, Deserialize, IntoParams)]
pub(crate) struct ListParams {
    /// Only this customer's orders.
    pub customer_email: Option<String>,
    /// Only orders in this status.
    pub status: Option<String>,
    /// At most this many (1 to 100, default 20).
    pub limit: Option<usize>,
    /// Where the previous page ended (its `next_cursor`).
    pub cursor: Option<String>,
}

/// The order list's filters and paging, checked.
#[derive(Debug)]
pub struct ListFilter {
    /// Only this customer's orders (normalised).
    pub customer_email: Option<String>,
    /// Only orders in this status.
    pub status: Option<OrderStatus>,
    /// At most this many (1 to 100).
    pub limit: usize,
    /// Where the previous page ended: (created at, order id).
    pub cursor: Option<(chrono::DateTime<chrono::Utc>, uuid::Uuid)>,
}

impl ListParams {
    /// Checks the parameters; a bad one is a 400 naming it.
    pub(super) fn check(&self) -> Result<ListFilter, ApiError> {
        let customer_email = self
            .customer_email
            .as_deref()
            .map(validate_email)
            .transpose()
            .map_err(|e| bad("customer_email", e.to_string()))?;
        let status = self
            .status
            .as_deref()
            .map(str::parse::<OrderStatus>)
            .transpose()
            .map_err(|e| bad("status", e))?;
        let limit = self.limit.unwrap_or(20);
        if !(1..=100).contains(&limit) {
            return Err(bad("limit", "limit must be between 1 and 100"));
        }
        let cursor = self
            .cursor
            .as_deref()
            .map(|c| {
                decode_cursor(c).ok_or_else(|| bad("cursor", "not a cursor this API returned"))
            })
            .transpose()?;
        Ok(ListFilter {
            customer_email,
            status,
            limit,
            cursor,
        })
    }
}

/// Orders, newest first. A customer lists only their own: without
/// `customer_email`, theirs; with another customer's, 403.
#[utoipa::path(
    get, path = "/api/orders", tag = "queries",
    params(ListParams),
    responses(
        (status = 200, description = "A page of orders", body = OrderPage),
        (status = 400, description = "Invalid filter", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Another customer's orders", body = ErrorBody),
    )
)]
async fn list_orders(
    State(service): State<Arc<dyn OrderQueries>>,
    caller: Caller,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<OrderPage>, ApiError> {
    let mut filter = params.check()?;
    if let Some(own) = caller.customer() {
        match &filter.customer_email {
            Some(email) => caller.may_act_for(email)?,
            None => filter.customer_email = Some(own.to_owned()),
        }
    }
    Ok(Json(service.list(filter).await?))
}

/// The search query.
#[derive(Debug, Default, Deserialize, IntoParams)]
pub(crate) struct SearchParams {
    /// Text found in the customer's email or a product's name.
    pub q: Option<String>,
}

/// Search results.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct SearchResult {
    /// Matching orders, newest first (at most 100).
    pub orders: Vec<OrderView>,
}

/// Orders by product name or customer email (admin only).
#[utoipa::path(
    get, path = "/api/orders/search", tag = "queries",
    params(SearchParams),
    responses(
        (status = 200, description = "Matching orders", body = SearchResult),
        (status = 400, description = "Missing or too long q", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
    )
)]
async fn search_orders(
    State(service): State<Arc<dyn OrderQueries>>,
    ApiQuery(params): ApiQuery<SearchParams>,
) -> Result<Json<SearchResult>, ApiError> {
    let q = crate::validate::required_text("q", params.q.as_deref().unwrap_or_default(), 100)
        .map_err(|e| bad("q", e.to_string()))?;
    let q = q.as_str();
    Ok(Json(SearchResult {
        orders: service.search(q, 100).await?,
    }))
}

/// An order's events, from the store, card tokens masked. A customer reads
/// only their own order's (403 otherwise).
#[utoipa::path(
    get, path = "/api/orders/{id}/events", tag = "queries",
    params(("id" = uuid::Uuid, Path, description = "The order")),
    responses(
        (status = 200, description = "Its history", body = [HistoryEvent]),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Another customer's order", body = ErrorBody),
        (status = 404, description = "No such order", body = ErrorBody),
    )
)]
async fn order_events(
    State(service): State<Arc<dyn OrderQueries>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<HistoryEvent>>, ApiError> {
    let order_id = parse_id("order", &id)?;
    let history = service.history(order_id).await?;
    if caller.customer().is_some() {
        // The order's first event names its customer.
        let owner = history
            .iter()
            .find_map(|e| e.data.get("customer_email").and_then(|v| v.as_str()))
            .unwrap_or_default();
        caller.may_act_for(owner)?;
    }
    Ok(Json(history))
}

/// Counts and revenue by status (admin only).
#[utoipa::path(
    get, path = "/api/stats", tag = "queries",
    responses(
        (status = 200, description = "Counts and revenue", body = Stats),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
    )
)]
async fn stats(State(service): State<Arc<dyn OrderQueries>>) -> Result<Json<Stats>, ApiError> {
    Ok(Json(service.stats().await?))
}

/// An event the read model refused and set aside.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ParkedView {
    /// The event's id.
    pub event_id: uuid::Uuid,
    /// Its type.
    pub event_type: String,
    /// Its stream.
    pub stream_id: String,
    /// Its position in the read model's source log.
    pub position: String,
    /// What the read model said.
    pub error: String,
    /// When it was set aside.
    pub failed_at: chrono::DateTime<chrono::Utc>,
}

/// The events the read model parked, oldest first (at most 1,000).
#[utoipa::path(
    get, path = "/api/admin/read-model/parked", tag = "queries",
    responses((status = 200, description = "Parked events", body = Vec<ParkedView>))
)]
async fn parked_events(
    State(service): State<Arc<dyn OrderQueries>>,
) -> Result<Json<Vec<ParkedView>>, ApiError> {
    let parked = service.parked_events(1_000).await?;
    Ok(Json(
        parked
            .into_iter()
            .map(|p| ParkedView {
                event_id: p.event_id,
                event_type: p.event_type,
                stream_id: p.stream_id.to_string(),
                position: p.position.to_string(),
                error: p.error,
                failed_at: p.failed_at,
            })
            .collect(),
    ))
}

/// What a replay of parked events did.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ReplayView {
    /// Applied to the read model, and no longer parked.
    pub applied: u64,
    /// No longer wanted by the read model: no longer parked.
    pub skipped: u64,
    /// Refused again: still parked, with the new error.
    pub still_parked: u64,
    /// Not found in their stream: still parked.
    pub missing: u64,
}

/// Applies the parked events again, after a fix to the read model: each one
/// applied leaves the parked list in the same transaction, so it is applied
/// once however often this is called.
#[utoipa::path(
    post, path = "/api/admin/read-model/parked/replay", tag = "queries",
    responses(
        (status = 200, description = "What the replay did", body = ReplayView),
        (status = 409, description = "The embedded read model replays at start-up", body = ErrorBody)
    )
)]
async fn replay_parked(
    State(service): State<Arc<dyn OrderQueries>>,
) -> Result<Json<ReplayView>, ApiError> {
    let report = service.replay_parked().await?;
    Ok(Json(ReplayView {
        applied: report.applied,
        skipped: report.skipped,
        still_parked: report.still_parked,
        missing: report.missing,
    }))
}
