//! JSON request bodies with the service's error shape: 413 past the body limit, 400 for
//! anything that is not the expected JSON. The Content-Type is not required, so game backends
//! can post with any HTTP client.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge {
                        limit_bytes: state.config.body_limit_bytes,
                    }
                } else {
                    ApiError::BadRequest(format!("could not read the request body: {rejection}"))
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|error| {
                ApiError::BadRequest(format!(
                    "the body is not valid JSON for this endpoint: {error}"
                ))
            })
    }
}

/// Query parameters with the service's error shape: 400 `invalid_body` (JSON) for parameters
/// that do not parse, instead of axum's plain-text rejection.
pub struct QueryParams<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(query)| QueryParams(query))
            .map_err(|rejection| {
                ApiError::BadRequest(format!(
                    "invalid query parameters: {}",
                    rejection.body_text()
                ))
            })
    }
}
