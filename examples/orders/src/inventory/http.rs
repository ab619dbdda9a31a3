//! The inventory service's HTTP surface.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

use super::{InventoryService, ProductView};
use crate::http::{parse_id, ApiError, ApiJson, ErrorBody};

/// The inventory service's OpenAPI document.
#[derive(Debug, OpenApi)]
#[openapi(
    paths(create_product, restock, get_product),
    components(schemas(CreateProduct, ProductCreatedBody, Restock, ProductView, ErrorBody)),
    tags((name = "products", description = "The catalog and its stock"))
)]
pub(crate) struct InventoryApi;

/// The inventory's routes: `POST /api/products`, `POST /api/products/{id}/restock`,
/// `GET /api/products/{id}`.
pub fn router(service: Arc<InventoryService>) -> Router {
    Router::new()
        .route("/api/products", post(create_product))
        .route("/api/products/{id}", get(get_product))
        .route("/api/products/{id}/restock", post(restock))
        .with_state(service)
}

/// A new product.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateProduct {
    /// Its name.
    #[schema(example = "Widget")]
    pub name: String,
    /// Its price, a decimal string.
    #[schema(example = "12.50")]
    pub price: String,
    /// Units on hand.
    #[schema(example = 10)]
    pub stock: i64,
}

/// The created product's id.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub(crate) struct ProductCreatedBody {
    /// The product.
    pub product_id: Uuid,
}

/// Units to add.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct Restock {
    /// How many (at least 1).
    pub quantity: i64,
}

/// Adds a product to the catalog (admin only).
#[utoipa::path(
    post, path = "/api/products", tag = "products",
    request_body = CreateProduct,
    responses(
        (status = 201, description = "Created", body = ProductCreatedBody),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 422, description = "Invalid product", body = ErrorBody),
    )
)]
async fn create_product(
    State(service): State<Arc<InventoryService>>,
    ApiJson(body): ApiJson<CreateProduct>,
) -> Result<(StatusCode, Json<ProductCreatedBody>), ApiError> {
    let product_id = service
        .create_product(&body.name, &body.price, body.stock)
        .await?;
    Ok((StatusCode::CREATED, Json(ProductCreatedBody { product_id })))
}

/// Adds units to a product's stock (admin only).
#[utoipa::path(
    post, path = "/api/products/{id}/restock", tag = "products",
    params(("id" = Uuid, Path, description = "The product")),
    request_body = Restock,
    responses(
        (status = 200, description = "Restocked", body = ProductView),
        (status = 401, description = "No valid bearer token", body = ErrorBody),
        (status = 403, description = "Not an admin", body = ErrorBody),
        (status = 404, description = "No such product", body = ErrorBody),
        (status = 422, description = "Invalid quantity", body = ErrorBody),
    )
)]
async fn restock(
    State(service): State<Arc<InventoryService>>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Restock>,
) -> Result<Json<ProductView>, ApiError> {
    let product_id = parse_id("product", &id)?;
    Ok(Json(service.restock(product_id, body.quantity).await?))
}

/// A product with its stock.
#[utoipa::path(
    get, path = "/api/products/{id}", tag = "products",
    params(("id" = Uuid, Path, description = "The product")),
    responses(
        (status = 200, description = "The product", body = ProductView),
        (status = 404, description = "No such product", body = ErrorBody),
    )
)]
async fn get_product(
    State(service): State<Arc<InventoryService>>,
    Path(id): Path<String>,
) -> Result<Json<ProductView>, ApiError> {
    let product_id = parse_id("product", &id)?;
    Ok(Json(service.product(product_id).await?))
}
