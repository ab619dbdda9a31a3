//! HTTP plumbing shared by the services' routers: the JSON extractor, the
//! error body, and the server with its limits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use utoipa::ToSchema;

use crate::Error;

/// The largest request body accepted, in bytes.
pub(crate) const MAX_BODY_BYTES: usize = 64 * 1024;

/// The JSON body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A stable machine-readable code.
    pub code: &'static str,
    /// What is wrong, for humans.
    pub message: String,
    /// The offending field, when one is to blame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error answered to an HTTP client.
#[derive(Debug)]
pub struct ApiError {
    /// The status.
    pub status: StatusCode,
    /// The body.
    pub body: ErrorBody,
}

impl ApiError {
    /// An error with a status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                code,
                message: message.into(),
                field: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        match error {
            Error::Validation { field, message } => Self {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                body: ErrorBody {
                    code: "validation_failed",
                    message: format!("{field}: {message}"),
                    field: Some(field),
                },
            },
            e @ Error::UnknownProduct { .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_product",
                e.to_string(),
            ),
            e @ Error::NotFound { .. } => {
                Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            Error::Conflict { message } => {
                Self::new(StatusCode::CONFLICT, "illegal_transition", message)
            }
            Error::Forbidden { message } => Self::new(StatusCode::FORBIDDEN, "forbidden", message),
            e @ Error::IdempotencyKeyReused { .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                e.to_string(),
            ),
            e @ Error::PromotionRedeemed { .. } => Self::new(
                StatusCode::CONFLICT,
                "promotion_already_redeemed",
                e.to_string(),
            ),
            e @ Error::NotCaughtUp { .. } => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_caught_up",
                format!("{e}; try again"),
            ),
            other => {
                tracing::error!(error = other.chain(), "request failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the server's log",
                )
            }
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let (status, code) = match &rejection {
            JsonRejection::JsonDataError(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_body"),
            JsonRejection::JsonSyntaxError(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            JsonRejection::MissingJsonContentType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_json")
            }
            _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
            }
            _ => (rejection.status(), "bad_request"),
        };
        let message = match status {
            StatusCode::PAYLOAD_TOO_LARGE => {
                format!("the request body is larger than {MAX_BODY_BYTES} bytes")
            }
            _ => rejection.body_text(),
        };
        Self::new(status, code, message)
    }
}

/// `axum::Json` whose rejections are [`ApiError`]s with a JSON body.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(Self(value))
    }
}

/// `axum::extract::Query` whose rejections are [`ApiError`]s with a JSON
/// body: a 400 `invalid_query` saying which parameter is wrong.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                rejection.body_text(),
            )),
        }
    }
}

/// Answers what no route matches with a JSON 404, and a method a path does
/// not take with a JSON 405, like every other error.
pub(crate) fn with_json_fallbacks<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
) -> Router<S> {
    router
        .fallback(|method: Method, uri: Uri| async move {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                format!("no route for {method} {}", uri.path()),
            )
        })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} does not take {method}", uri.path()),
            )
        })
}

/// Parses a path id, answering 404 with a JSON body when it is not a UUID.
pub(crate) fn parse_id(what: &str, raw: &str) -> Result<uuid::Uuid, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} {raw:?} not found: ids are UUIDs"),
        )
    })
}

/// What a listener allows each client, so that no client holds a worker, a
/// connection or memory without bound.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct Limits {
    /// Seconds a client has to send a request's headers; a connection idle
    /// between requests for as long is closed too.
    #[arg(long, env = "ORDERS_HEADER_TIMEOUT_SECS", default_value_t = Limits::DEFAULT.header_timeout_secs)]
    pub header_timeout_secs: u64,
    /// Seconds a request may take, reading its body included (then 503).
    #[arg(long, env = "ORDERS_REQUEST_TIMEOUT_SECS", default_value_t = Limits::DEFAULT.request_timeout_secs)]
    pub request_timeout_secs: u64,
    /// Connections open at once; more are closed as soon as accepted.
    #[arg(long, env = "ORDERS_MAX_CONNECTIONS", default_value_t = Limits::DEFAULT.max_connections)]
    pub max_connections: usize,
    /// Requests handled at once; more are answered 503 with `Retry-After`.
    #[arg(long, env = "ORDERS_MAX_IN_FLIGHT", default_value_t = Limits::DEFAULT.max_in_flight)]
    pub max_in_flight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl Limits {
    /// The defaults of the flags.
    pub const DEFAULT: Self = Self {
        header_timeout_secs: 10,
        request_timeout_secs: 30,
        max_connections: 4096,
        max_in_flight: 1024,
    };

    /// `router` behind the request timeout and the in-flight cap (one cap
    /// shared by every route): a request over either is answered 503 with
    /// `Retry-After: 1`.
    pub fn apply(&self, router: Router) -> Router {
        router.layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(overloaded))
                .load_shed()
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                    self.max_in_flight.max(1),
                ))
                .timeout(Duration::from_secs(self.request_timeout_secs.max(1))),
        )
    }
}

/// The answer to a request that was shed or ran out of time.
async fn overloaded(error: tower::BoxError) -> Response {
    let (code, message) = if error.is::<tower::timeout::error::Elapsed>() {
        ("timeout", "the request took too long")
    } else {
        ("overloaded", "too many requests at once; retry shortly")
    };
    let mut response =
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message).into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Serves `router` on `listen` until Ctrl-C or SIGTERM, within `limits`,
/// after calling `ready` with the bound address.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    router: Router,
    listen: SocketAddr,
    limits: Limits,
    ready: impl FnOnce(SocketAddr),
) -> crate::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| Error::caused(format!("cannot listen on {listen}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::caused("reading the listener's address", e))?;
    tracing::info!(%addr, ?limits, "listening");
    ready(addr);
    serve_on(listener, router, limits, shutdown_signal()).await;
    Ok(())
}

/// Serves `router` on `listener` within `limits` until `shutdown` resolves,
/// then lets the open requests finish (at most 10 s).
pub async fn serve_on(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let service = hyper_util::service::TowerToHyperService::new(limits.apply(router));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_timeout_secs.max(1)));
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            metrics::counter!("http_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let connection = graceful
            .watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service.clone()));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10 s; closing them");
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let term = async {
        #[cfg(unix)]
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
            return;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}
