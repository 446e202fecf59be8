//! The one JSON error shape of the HTTP edge, `{"error":{"code":"...","message":"..."}}`, for handlers, for
//! refusals written on a bare socket (the WebSocket upgrade) and as `ApiError` for `?`.

use actix_web::HttpResponse;
use actix_web::http::StatusCode;

/// The body of every API error.
pub fn error_body(code: &str, message: &str) -> serde_json::Value {
    serde_json::json!({ "error": { "code": code, "message": message } })
}

/// `{"error":{"code":"...","message":"..."}}` with a status: every API error looks like this.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> HttpResponse {
    HttpResponse::build(status).json(error_body(code, message))
}

/// An error answered by the API: status, code and message, rendered as the JSON error shape.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl actix_web::ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        error_response(self.status, self.code, &self.message)
    }
}
