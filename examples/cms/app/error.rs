//! Errors as HTTP answers: every client mistake is a 4xx with a JSON body
//! `{"error": …, "field": …}`; only a failure of the server itself is a 500.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// 422: a field's value is not acceptable.
    #[error("{message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// 422: well-formed JSON of the wrong shape; `field` when serde named it.
    #[error("{message}")]
    Unprocessable {
        field: Option<String>,
        message: String,
    },
    /// 400: the request itself cannot be read.
    #[error("{0}")]
    BadRequest(String),
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 409: a unique value is taken, or the row is still in use.
    #[error("{0}")]
    Conflict(String),
    /// 415
    #[error("expected a request with `Content-Type: application/json`")]
    UnsupportedMediaType,
    /// 413: the body is over the limit.
    #[error("the request body is over the limit of {0} bytes")]
    PayloadTooLarge(usize),
    /// 503: the server is too busy for this now; try again.
    #[error("{0}")]
    Unavailable(String),
    /// Any other status, with the message to show (the answers the router
    /// and the HTTP layer make themselves: 405, 408, 414, 431).
    #[error("{1}")]
    Status(StatusCode, String),
    /// 501: this build has no search (`--no-default-features`).
    #[cfg_attr(feature = "search", allow(dead_code))]
    #[error("search is not enabled in this build (cargo feature `search`)")]
    SearchDisabled,
    /// 500: the database or the index failed; logged, not shown.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            message: message.into(),
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } | Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Status(status, _) => *status,
            Self::SearchDisabled => StatusCode::NOT_IMPLEMENTED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                Self::Conflict("that value is already taken".into())
            }
            // A row this one refers to went away, or one that refers to it
            // came, while the request ran: the handlers say which.
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                Self::Conflict("a row this refers to changed meanwhile; try again".into())
            }
            // PostgreSQL's text that the checks did not catch: invalid byte
            // sequence, untranslatable character.
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("22021" | "22P05")) =>
            {
                Self::Unprocessable {
                    field: None,
                    message: "the text holds characters the database cannot store".into(),
                }
            }
            sqlx::Error::PoolTimedOut => {
                Self::Unavailable("the database is busy; try again".into())
            }
            _ => Self::Internal(error.into()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(source) = &self {
            tracing::error!(error = %source, "request failed");
        }
        let body = match &self {
            Self::Invalid { field, message } => json!({ "error": message, "field": field }),
            Self::Unprocessable {
                field: Some(field),
                message,
            } => json!({ "error": message, "field": field }),
            other => json!({ "error": other.to_string() }),
        };
        (self.status(), axum::Json(body)).into_response()
    }
}

/// A JSON request body whose rejections are JSON errors too: 400 for
/// malformed JSON, 422 for valid JSON of the wrong shape.
pub(crate) struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(JsonRejection::JsonDataError(error)) => {
                let message = error.body_text();
                Err(ApiError::Unprocessable {
                    field: named_field(&message),
                    message,
                })
            }
            Err(JsonRejection::MissingJsonContentType(_)) => Err(ApiError::UnsupportedMediaType),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::PayloadTooLarge(super::BODY_LIMIT))
            }
            Err(rejection) => Err(ApiError::BadRequest(rejection.body_text())),
        }
    }
}

/// Checks a text field: no NUL and no other control character but tab and
/// line breaks, which no database column of the CMS should hold (PostgreSQL
/// refuses NUL outright).
pub(crate) fn valid_text<'a>(field: &'static str, text: &'a str) -> Result<&'a str, ApiError> {
    match text
        .chars()
        .find(|&c| c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
    {
        Some(c) => Err(ApiError::invalid(
            field,
            format!(
                "`{field}` holds the control character U+{:04X}",
                u32::from(c)
            ),
        )),
        None => Ok(text),
    }
}

/// The field serde names in "missing field `title`" or "unknown field `x`".
fn named_field(message: &str) -> Option<String> {
    let (_, rest) = message.split_once(" field `")?;
    let (field, _) = rest.split_once('`')?;
    Some(field.to_owned())
}
