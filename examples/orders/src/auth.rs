//! Authentication and authorisation of the HTTP API: bearer tokens (JWT)
//! signed with an HS256 secret or an RS256 key, checked by one middleware
//! (`authenticate`) at the edge of every process that has a key, and one
//! extractor ([`Caller`]) through which handlers apply the per-order rules.
//!
//! The rules:
//! - `/health`, `/metrics`, `/openapi.json` and every path outside `/api`
//!   are open.
//! - Every `/api` path needs a valid token (else 401 with
//!   `WWW-Authenticate: Bearer`).
//! - A token whose `role` (or one of its `roles`) is `admin` may do anything.
//!   Any other token is a customer's and needs an `email` claim.
//! - Creating and restocking products, searching orders, the statistics and
//!   any other customer's list are the admin's (`Access::Admin`); a
//!   customer gets 403.
//! - A customer places orders in their own email, and reads, lists and
//!   cancels only their own orders (403 otherwise); `GET /api/orders`
//!   without `customer_email` lists their own.
//!
//! Without a key nothing is checked: the embedded demo stays open and says so
//! at start-up.
//!
//! The middleware hands the caller to the handlers in the
//! `CALLER_HEADER` header, replacing any the client sent; the gateway
//! forwards it with the bearer token to the services behind it. A service
//! without a key of its own trusts that header: such a service must only be
//! reachable through the gateway. A request without the header is
//! unrestricted, so the header can only narrow what a request may do.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::http::ApiError;
use crate::{Error, Result};

/// The header in which the edge tells the handlers (and the services behind
/// the gateway) who is calling: `admin` or `customer <email>`.
pub(crate) const CALLER_HEADER: &str = "x-orders-caller";

/// The role that may do anything.
pub const ADMIN: &str = "admin";

/// The role of a customer's token.
pub const CUSTOMER: &str = "customer";

/// Seconds a token is still accepted after its `exp` (clock skew between the
/// issuer and this process).
pub(crate) const LEEWAY_SECS: u64 = 30;

/// The authentication settings (flags and environment variables).
#[derive(Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// The HS256 secret that signs bearer tokens. With it (or an RS256 key)
    /// every `/api` request needs a token; `orders token` mints them with it.
    #[arg(long, env = "ORDERS_JWT_SECRET", hide_env_values = true, global = true)]
    pub jwt_hs256_secret: Option<String>,
    /// A PEM file holding the RS256 public key that verifies bearer tokens.
    #[arg(long, env = "ORDERS_JWT_PUBLIC_KEY_FILE", global = true)]
    pub jwt_rs256_public_key_file: Option<PathBuf>,
    /// When set, tokens must carry this `iss`.
    #[arg(long, env = "ORDERS_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    #[arg(long, env = "ORDERS_JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,
}

impl std::fmt::Debug for AuthArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthArgs")
            .field(
                "jwt_hs256_secret",
                &self.jwt_hs256_secret.as_ref().map(|_| "***"),
            )
            .field("jwt_rs256_public_key_file", &self.jwt_rs256_public_key_file)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .finish()
    }
}

impl AuthArgs {
    /// The authenticator these settings describe; `None` when neither a
    /// secret nor a key is configured (nothing is checked).
    ///
    /// # Errors
    /// When the secret is empty or the key file cannot be read or parsed.
    pub fn authenticator(&self) -> Result<Option<Arc<Authenticator>>> {
        let hs256 = match self.jwt_hs256_secret.as_deref() {
            None => None,
            Some("") => return Err(Error::internal("the JWT secret is empty")),
            Some(secret) => Some(
                DecodingKey::from_secret(secret.as_bytes())
                    .map_err(|e| Error::caused("the JWT secret cannot be used", e))?,
            ),
        };
        let rs256 = match &self.jwt_rs256_public_key_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    Error::caused(format!("cannot read the JWT key {}", path.display()), e)
                })?;
                Some(DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                    Error::caused(
                        format!("{} is not an RSA public key in PEM", path.display()),
                        e,
                    )
                })?)
            }
        };
        if hs256.is_none() && rs256.is_none() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Authenticator {
            hs256,
            rs256,
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
        })))
    }
}

/// Checks bearer tokens against the configured secret or key.
pub struct Authenticator {
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("hs256", &self.hs256.is_some())
            .field("rs256", &self.rs256.is_some())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

/// The claims this API reads from a token (and [`mint`] writes).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Claims {
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// The subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// The customer's email.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The role (`admin` or `customer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Roles, as some issuers list them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// The issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

impl Claims {
    /// Claims of a token for `role` (and `email`) that expires `ttl` from
    /// now.
    pub fn new(role: &str, email: Option<&str>, ttl: Duration) -> Self {
        let now = now_secs();
        Self {
            exp: now.saturating_add(ttl.as_secs()),
            iat: Some(now),
            sub: email.map(str::to_owned),
            email: email.map(str::to_owned),
            role: Some(role.to_owned()),
            ..Self::default()
        }
    }
}

/// What a verified token says about its holder: the claims the rules read,
/// whatever else an issuer puts in (an `aud` list, say).
#[derive(Debug, Deserialize)]
struct Holder {
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

impl Holder {
    fn is_admin(&self) -> bool {
        self.role.as_deref() == Some(ADMIN) || self.roles.iter().any(|r| r == ADMIN)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Signs `claims` with the HS256 `secret`.
///
/// # Errors
/// When the secret is empty or the claims cannot be encoded.
pub fn mint(secret: &str, claims: &Claims) -> Result<String> {
    if secret.is_empty() {
        return Err(Error::internal("the JWT secret is empty"));
    }
    let key = EncodingKey::from_secret(secret.as_bytes())
        .map_err(|e| Error::caused("the JWT secret cannot be used", e))?;
    jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256), claims, &key)
        .map_err(|e| Error::caused("encoding the token", e))
}

/// Parses a token lifetime: `90s`, `15m`, `1h`, `7d` or a number of seconds.
///
/// # Errors
/// When it is not one of those, or zero.
pub fn parse_ttl(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid lifetime {s:?}: expected e.g. 15m, 1h, 7d"))?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("invalid lifetime unit {unit:?}: use s, m, h or d")),
    };
    match n.checked_mul(unit_secs) {
        Some(0) | None => Err(format!("lifetime {s:?} out of range")),
        Some(secs) => Ok(Duration::from_secs(secs)),
    }
}

/// Who is calling, as the edge established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Nothing was checked: no key is configured, or the request came from
    /// inside the deployment without a caller.
    Unrestricted,
    /// A token with the admin role.
    Admin,
    /// A customer's token: their (normalised) email.
    Customer(String),
}

impl Caller {
    /// The customer whose orders alone this caller may touch, if any.
    pub fn customer(&self) -> Option<&str> {
        match self {
            Self::Customer(email) => Some(email),
            Self::Unrestricted | Self::Admin => None,
        }
    }

    /// Allows the caller to act on what belongs to `email` (normalised):
    /// a customer only on their own, anyone else on everything.
    ///
    /// # Errors
    /// 403 when a customer asks for another customer's.
    pub(crate) fn may_act_for(&self, email: &str) -> Result<(), ApiError> {
        match self.customer() {
            Some(own) if own != email => Err(forbidden("this belongs to another customer")),
            _ => Ok(()),
        }
    }

    fn header_value(&self) -> Option<HeaderValue> {
        match self {
            Self::Unrestricted => None,
            Self::Admin => Some(HeaderValue::from_static(ADMIN)),
            Self::Customer(email) => HeaderValue::from_str(&format!("{CUSTOMER} {email}")).ok(),
        }
    }

    fn from_header(value: &HeaderValue) -> Option<Self> {
        let value = value.to_str().ok()?;
        if value == ADMIN {
            return Some(Self::Admin);
        }
        let email = value.strip_prefix(CUSTOMER)?.strip_prefix(' ')?;
        crate::validate::email("email", email)
            .ok()
            .map(Self::Customer)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        match parts.headers.get(CALLER_HEADER) {
            None => Ok(Self::Unrestricted),
            Some(value) => Self::from_header(value)
                .ok_or_else(|| forbidden(format!("{CALLER_HEADER} is not a caller"))),
        }
    }
}

/// What a request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Nothing: health, metrics, the OpenAPI document, non-API paths.
    Open,
    /// A valid token; the handler applies the per-order rules.
    Authenticated,
    /// A token with the admin role.
    Admin,
}

impl Access {
    /// What `method` on `path` needs.
    pub(crate) fn of(method: &Method, path: &str) -> Self {
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
        match segments.as_slice() {
            ["", "api", "products", _] if method == Method::GET => Self::Authenticated,
            ["", "api", "products", ..] | ["", "api", "stats", ..] | ["", "api", "admin", ..] => {
                Self::Admin
            }
            ["", "api", "orders", "search"] => Self::Admin,
            ["", "api", ..] => Self::Authenticated,
            _ => Self::Open,
        }
    }
}

fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

/// A 401 with `WWW-Authenticate: Bearer` (and the RFC 6750 error code when a
/// token was sent).
fn unauthorized(code: &'static str, message: &str) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, code, message).into_response();
    let challenge = if code == "missing_token" {
        HeaderValue::from_static("Bearer")
    } else {
        HeaderValue::from_static("Bearer error=\"invalid_token\"")
    };
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, challenge);
    response
}

impl Authenticator {
    /// The caller a bearer token names.
    ///
    /// # Errors
    /// The 401 answer when the token is not valid.
    #[allow(clippy::result_large_err)] // The error is the answer itself.
    pub fn caller(&self, token: &str) -> Result<Caller, Response> {
        let invalid = |message: &str| unauthorized("invalid_token", message);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid("the bearer token is not a JWT"))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rs256.as_ref(),
            _ => None,
        }
        .ok_or_else(|| invalid("the token's algorithm is not accepted here"))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        match &self.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let holder = jsonwebtoken::decode::<Holder>(token, key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => {
                    unauthorized("token_expired", "the bearer token has expired")
                }
                ErrorKind::InvalidIssuer => invalid("the token's issuer is not accepted"),
                ErrorKind::InvalidAudience => invalid("the token's audience is not accepted"),
                ErrorKind::MissingRequiredClaim(claim) => {
                    invalid(&format!("the token has no {claim} claim"))
                }
                _ => invalid("the bearer token is not valid"),
            })?
            .claims;
        if holder.is_admin() {
            return Ok(Caller::Admin);
        }
        let email = holder
            .email
            .as_deref()
            .ok_or_else(|| invalid("a customer's token needs an email claim"))?;
        let email = crate::validate::email("email", email)
            .map_err(|_| invalid("the token's email claim is not an email address"))?;
        Ok(Caller::Customer(email))
    }
}

/// The middleware: with an authenticator, checks the bearer token of every
/// request that needs one (see [`Access`]) and passes the caller on in
/// [`CALLER_HEADER`]; without one, passes every request through untouched.
pub(crate) async fn authenticate(
    State(auth): State<Option<Arc<Authenticator>>>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(auth) = auth else {
        return next.run(request).await;
    };
    // Only this middleware says who is calling.
    request.headers_mut().remove(CALLER_HEADER);
    let access = Access::of(request.method(), request.uri().path());
    if access == Access::Open {
        return next.run(request).await;
    }
    let token = match request.headers().get(header::AUTHORIZATION) {
        None => return unauthorized("missing_token", "this request needs a bearer token"),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim),
    };
    let Some(token) = token else {
        return unauthorized(
            "invalid_token",
            "the Authorization header must be `Bearer <token>`",
        );
    };
    let caller = match auth.caller(token) {
        Ok(caller) => caller,
        Err(response) => return response,
    };
    if access == Access::Admin && caller != Caller::Admin {
        return forbidden("this needs the admin role").into_response();
    }
    if let Some(value) = caller.header_value() {
        request.headers_mut().insert(CALLER_HEADER, value);
    }
    next.run(request).await
}

/// `router` behind [`authenticate`] with `auth`.
pub(crate) fn protect(router: Router, auth: Option<Arc<Authenticator>>) -> Router {
    router.layer(axum::middleware::from_fn_with_state(auth, authenticate))
}

/// Adds the bearer-token scheme to `doc` and requires it on every `/api`
/// operation (it is enforced once a key is configured).
pub fn document(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement};
    const SCHEME: &str = "bearer";
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            SCHEME,
            utoipa::openapi::security::SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "Required once the server has a key (--jwt-hs256-secret or \
                         --jwt-rs256-public-key-file); claims: exp, role (admin or \
                         customer), email (a customer's)",
                    ))
                    .build(),
            ),
        );
    for (path, item) in &mut doc.paths.paths {
        if !path.starts_with("/api") {
            continue;
        }
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            operation.security = Some(vec![SecurityRequirement::new(SCHEME, Vec::<String>::new())]);
        }
    }
}

/// Masks a card token for display: its first four and last four characters
/// when it is long enough to keep them hidden in between, else `***`.
pub(crate) fn mask_card_token(token: &str) -> String {
    let chars: Vec<char> = token.chars().collect();
    if chars.len() < 12 {
        return "***".to_owned();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

/// Masks every `card_token` string anywhere in `value`.
pub(crate) fn mask_card_tokens(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, field) in map.iter_mut() {
                match field {
                    serde_json::Value::String(token) if key == "card_token" => {
                        *token = mask_card_token(token);
                    }
                    other => mask_card_tokens(other),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(mask_card_tokens),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::{get, post};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const SECRET: &str = "a test secret";

    fn hs256() -> Option<Arc<Authenticator>> {
        AuthArgs {
            jwt_hs256_secret: Some(SECRET.into()),
            ..AuthArgs::default()
        }
        .authenticator()
        .unwrap()
    }

    /// A router whose routes answer the caller they were given.
    fn app(auth: Option<Arc<Authenticator>>) -> Router {
        let echo = |caller: Caller| async move { format!("{caller:?}") };
        protect(
            Router::new()
                .route("/health", get(echo))
                .route("/api/stats", get(echo))
                .route("/api/products", post(echo))
                .route("/api/products/{id}", get(echo))
                .route("/api/orders", get(echo).post(echo)),
            auth,
        )
    }

    async fn call(
        app: &Router,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Option<String>, String) {
        let mut request = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let challenge = response
            .headers()
            .get(header::WWW_AUTHENTICATE)
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            challenge,
            String::from_utf8_lossy(&body).into_owned(),
        )
    }

    fn bearer(token: &str) -> String {
        format!("Bearer {token}")
    }

    fn customer(email: &str) -> String {
        mint(
            SECRET,
            &Claims::new(CUSTOMER, Some(email), Duration::from_secs(60)),
        )
        .unwrap()
    }

    fn admin() -> String {
        mint(SECRET, &Claims::new(ADMIN, None, Duration::from_secs(60))).unwrap()
    }

    #[tokio::test]
    async fn without_a_key_everything_passes_untouched() {
        let app = app(None);
        let (status, _, body) = call(&app, "GET", "/api/stats", &[]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "Unrestricted"));
        // A caller passed on from a gateway is kept.
        let (_, _, body) = call(
            &app,
            "GET",
            "/api/orders",
            &[(CALLER_HEADER, "customer ada@example.com")],
        )
        .await;
        assert_eq!(body, "Customer(\"ada@example.com\")");
    }

    #[tokio::test]
    async fn missing_invalid_and_expired_tokens_are_401_with_a_challenge() {
        let app = app(hs256());
        let (status, challenge, body) = call(&app, "GET", "/api/orders", &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(challenge.as_deref(), Some("Bearer"));
        assert!(body.contains("\"code\":\"missing_token\""), "{body}");

        let forged = mint(
            "another secret",
            &Claims::new(ADMIN, None, Duration::from_secs(60)),
        )
        .unwrap();
        let mut expired = Claims::new(ADMIN, None, Duration::from_secs(60));
        expired.exp = now_secs() - 3600;
        let expired = mint(SECRET, &expired).unwrap();
        for (token, code) in [
            (bearer(&forged), "invalid_token"),
            (bearer("not.a.jwt"), "invalid_token"),
            (admin(), "invalid_token"),
            (bearer(&expired), "token_expired"),
        ] {
            let (status, challenge, body) =
                call(&app, "GET", "/api/orders", &[("authorization", &token)]).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{token}: {body}");
            assert_eq!(challenge.as_deref(), Some("Bearer error=\"invalid_token\""));
            assert!(body.contains(&format!("\"code\":\"{code}\"")), "{body}");
        }
        // A customer's token without an email is no customer's.
        let nobody = mint(
            SECRET,
            &Claims::new(CUSTOMER, None, Duration::from_secs(60)),
        )
        .unwrap();
        let (status, _, _) = call(
            &app,
            "GET",
            "/api/orders",
            &[("authorization", &bearer(&nobody))],
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn roles_and_the_caller_header() {
        let app = app(hs256());
        let ada = bearer(&customer("Ada@Example.com"));
        let admin = bearer(&admin());
        // Open paths need nothing.
        assert_eq!(call(&app, "GET", "/health", &[]).await.0, StatusCode::OK);
        // Admin routes refuse a customer.
        for (method, path) in [("GET", "/api/stats"), ("POST", "/api/products")] {
            let (status, _, body) = call(&app, method, path, &[("authorization", &ada)]).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
            assert!(body.contains("\"code\":\"forbidden\""), "{body}");
            let (status, _, body) = call(&app, method, path, &[("authorization", &admin)]).await;
            assert_eq!((status, body.as_str()), (StatusCode::OK, "Admin"));
        }
        // A customer reaches the customer routes as themselves, whatever
        // caller header they send.
        let (status, _, body) = call(
            &app,
            "GET",
            "/api/orders",
            &[("authorization", &ada), (CALLER_HEADER, "admin")],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "Customer(\"ada@example.com\")");
        let (status, _, _) = call(&app, "GET", "/api/products/x", &[("authorization", &ada)]).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[test]
    fn customers_act_for_themselves_only() {
        let ada = Caller::Customer("ada@example.com".into());
        assert!(ada.may_act_for("ada@example.com").is_ok());
        let refused = ada.may_act_for("bob@example.com").unwrap_err();
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert!(Caller::Admin.may_act_for("bob@example.com").is_ok());
        assert!(Caller::Unrestricted.may_act_for("bob@example.com").is_ok());
    }

    #[tokio::test]
    async fn rs256_tokens_verify_with_the_public_key_and_issuer_and_audience() {
        let dir = env!("CARGO_MANIFEST_DIR");
        let auth = AuthArgs {
            jwt_rs256_public_key_file: Some(
                format!("{dir}/tests/fixtures/jwt-rs256-test.pub").into(),
            ),
            jwt_issuer: Some("https://issuer.example".into()),
            jwt_audience: Some("orders".into()),
            ..AuthArgs::default()
        }
        .authenticator()
        .unwrap()
        .unwrap();
        let private = std::fs::read(format!("{dir}/tests/fixtures/jwt-rs256-test.key")).unwrap();
        let key = EncodingKey::from_rsa_pem(&private).unwrap();
        let sign = |iss: &str, aud: &str| {
            let mut claims =
                Claims::new(CUSTOMER, Some("ada@example.com"), Duration::from_secs(60));
            claims.iss = Some(iss.into());
            claims.aud = Some(aud.into());
            jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::RS256), &claims, &key)
                .unwrap()
        };
        assert_eq!(
            auth.caller(&sign("https://issuer.example", "orders"))
                .unwrap(),
            Caller::Customer("ada@example.com".into())
        );
        assert!(auth
            .caller(&sign("https://other.example", "orders"))
            .is_err());
        assert!(auth
            .caller(&sign("https://issuer.example", "other"))
            .is_err());
        // An issuer's audience list and roles list.
        let listed = serde_json::json!({
            "exp": now_secs() + 60,
            "iss": "https://issuer.example",
            "aud": ["billing", "orders"],
            "roles": ["reader", "admin"],
        });
        let listed =
            jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::RS256), &listed, &key)
                .unwrap();
        assert_eq!(auth.caller(&listed).unwrap(), Caller::Admin);
        // No HS256 secret is configured: an HS256 token is refused.
        assert!(auth.caller(&customer("ada@example.com")).is_err());
    }

    #[test]
    fn card_tokens_are_masked_anywhere() {
        let mut v = serde_json::json!({
            "card_token": "tok_ok",
            "payment": {"card_token": "tok_4242424242424242"},
            "lines": [{"card_token": "tok_visa_0000001234"}],
            "other": "tok_ok",
        });
        mask_card_tokens(&mut v);
        assert_eq!(v["card_token"], "***");
        assert_eq!(v["payment"]["card_token"], "tok_…4242");
        assert_eq!(v["lines"][0]["card_token"], "tok_…1234");
        assert_eq!(v["other"], "tok_ok");
    }

    #[test]
    fn lifetimes() {
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_ttl("90"), Ok(Duration::from_secs(90)));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("").is_err());
    }

    #[test]
    fn access_by_route() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(Access::of(&get, "/health"), Access::Open);
        assert_eq!(Access::of(&get, "/openapi.json"), Access::Open);
        assert_eq!(Access::of(&get, "/metrics"), Access::Open);
        assert_eq!(Access::of(&post, "/api/products"), Access::Admin);
        assert_eq!(Access::of(&post, "/api/products/x/restock"), Access::Admin);
        assert_eq!(Access::of(&get, "/api/products/x"), Access::Authenticated);
        assert_eq!(Access::of(&get, "/api/orders/search"), Access::Admin);
        assert_eq!(Access::of(&get, "/api/stats"), Access::Admin);
        assert_eq!(
            Access::of(&get, "/api/admin/read-model/parked"),
            Access::Admin
        );
        assert_eq!(
            Access::of(&post, "/api/admin/read-model/parked/replay"),
            Access::Admin
        );
        assert_eq!(Access::of(&get, "/api/orders"), Access::Authenticated);
        assert_eq!(Access::of(&post, "/api/orders"), Access::Authenticated);
        assert_eq!(
            Access::of(&post, "/api/orders/x/cancel"),
            Access::Authenticated
        );
        assert_eq!(
            Access::of(&get, "/api/orders/x/events"),
            Access::Authenticated
        );
    }
}
