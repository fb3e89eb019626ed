//! Checks recorded HTTP exchanges against an OpenAPI 3.1 document: the path must match a
//! documented path template, the method must be documented for it, the status must be
//! documented for that operation, the Content-Type must be one the response documents, and a
//! JSON body must validate against the documented schema (JSON Schema 2020-12, with
//! `#/components/...` references resolved against the document's components).
//!
//! Two answers are not operations of their own, and are checked against the document's reusable
//! responses instead: a path the document does not list must get the fallback's 404
//! `not_found` (`#/components/responses/NotFound`), and a documented path asked with a method it
//! does not list must get 405 `method_not_allowed` (`#/components/responses/MethodNotAllowed`).

use std::collections::HashMap;

use serde_json::Value;

/// One request and its response, as a test made it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    /// The concrete path, without the query.
    pub path: String,
    pub query: Option<String>,
    pub status: u16,
    pub content_type: Option<String>,
    pub body: String,
}

impl Exchange {
    fn describe(&self) -> String {
        let query = self
            .query
            .as_deref()
            .map(|query| format!("?{query}"))
            .unwrap_or_default();
        format!("{} {}{query} -> {}", self.method, self.path, self.status)
    }
}

/// Longest body excerpt a failure message shows.
const EXCERPT_CHARS_MAX: usize = 600;

fn excerpt(body: &str) -> String {
    if body.chars().count() <= EXCERPT_CHARS_MAX {
        body.to_string()
    } else {
        let cut: String = body.chars().take(EXCERPT_CHARS_MAX).collect();
        format!("{cut}...")
    }
}

/// Compiled validators, by documented response and media type.
type Validators = HashMap<String, Result<jsonschema::Validator, String>>;

/// Checks every exchange; returns one message per exchange that does not match.
pub fn check(document: &Value, exchanges: &[Exchange]) -> Vec<String> {
    let mut validators = Validators::new();
    exchanges
        .iter()
        .filter_map(|exchange| {
            check_one(document, exchange, &mut validators)
                .err()
                .map(|why| format!("  {}: {why}", exchange.describe()))
        })
        .collect()
}

/// The documented path template `path` matches: literal segments are equal and `{name}` takes
/// any one non-empty segment. Where several match, the one with the most literal segments wins
/// (concrete paths before templated ones, as OpenAPI says).
pub fn match_path<'a>(document: &'a Value, path: &str) -> Option<&'a str> {
    let segments: Vec<&str> = path.split('/').collect();
    document["paths"]
        .as_object()?
        .keys()
        .filter_map(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            if parts.len() != segments.len() {
                return None;
            }
            let mut literals = 0;
            for (part, segment) in parts.iter().zip(&segments) {
                if part.starts_with('{') && part.ends_with('}') {
                    if segment.is_empty() {
                        return None;
                    }
                } else if part == segment {
                    literals += 1;
                } else {
                    return None;
                }
            }
            Some((literals, template.as_str()))
        })
        .max_by_key(|(literals, _)| *literals)
        .map(|(_, template)| template)
}

fn check_one(
    document: &Value,
    exchange: &Exchange,
    validators: &mut Validators,
) -> Result<(), String> {
    let Some(template) = match_path(document, &exchange.path) else {
        return check_fallback(document, exchange, 404, "not_found", "NotFound", validators)
            .map_err(|why| format!("the path matches no documented path, and {why}"));
    };
    let method = exchange.method.to_lowercase();
    let Some(operation) = document["paths"][template].get(&method) else {
        return check_fallback(
            document,
            exchange,
            405,
            "method_not_allowed",
            "MethodNotAllowed",
            validators,
        )
        .map_err(|why| {
            format!(
                "{} is not documented for {template}, and {why}",
                exchange.method
            )
        });
    };
    let responses = &operation["responses"];
    let status = exchange.status.to_string();
    let range = format!("{}XX", exchange.status / 100);
    let response = [status.as_str(), range.as_str(), "default"]
        .iter()
        .find_map(|key| responses.get(*key))
        .ok_or_else(|| {
            let documented: Vec<&String> = responses
                .as_object()
                .map(|map| map.keys().collect())
                .unwrap_or_default();
            format!(
                "status {status} is not documented for {} {template} (documented: {documented:?}); body: {}",
                exchange.method,
                excerpt(&exchange.body)
            )
        })?;
    let response = resolve(document, response)?;
    check_body(
        document,
        &format!("{method} {template} {status}"),
        response,
        exchange,
        validators,
    )
}

/// An answer of the router's fallbacks: the status, the documented reusable response, the code.
fn check_fallback(
    document: &Value,
    exchange: &Exchange,
    status: u16,
    code: &str,
    response_name: &str,
    validators: &mut Validators,
) -> Result<(), String> {
    if exchange.status != status {
        return Err(format!(
            "the status is not the fallback's {status} {code}; body: {}",
            excerpt(&exchange.body)
        ));
    }
    let response = document
        .pointer(&format!("/components/responses/{response_name}"))
        .ok_or_else(|| format!("the document has no #/components/responses/{response_name}"))?;
    check_body(document, response_name, response, exchange, validators)?;
    let body: Value = serde_json::from_str(&exchange.body).unwrap_or(Value::Null);
    if body["code"] == code {
        Ok(())
    } else {
        Err(format!(
            "the code is not the fallback's {code}: {}",
            excerpt(&exchange.body)
        ))
    }
}

/// Follows a local `$ref` (`#/components/responses/...`).
fn resolve<'a>(document: &'a Value, value: &'a Value) -> Result<&'a Value, String> {
    match value.get("$ref").and_then(Value::as_str) {
        None => Ok(value),
        Some(reference) => reference
            .strip_prefix('#')
            .and_then(|pointer| document.pointer(pointer))
            .ok_or_else(|| format!("the document's reference {reference} does not resolve")),
    }
}

fn check_body(
    document: &Value,
    key: &str,
    response: &Value,
    exchange: &Exchange,
    validators: &mut Validators,
) -> Result<(), String> {
    let content = response
        .get("content")
        .and_then(Value::as_object)
        .filter(|content| !content.is_empty());
    let Some(content) = content else {
        return if exchange.body.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "the documented response has no body, but one was sent: {}",
                excerpt(&exchange.body)
            ))
        };
    };
    let media_type = exchange
        .content_type
        .as_deref()
        .and_then(|value| value.split(';').next())
        .map(|value| value.trim().to_ascii_lowercase())
        .ok_or_else(|| {
            format!(
                "the response has no Content-Type; body: {}",
                excerpt(&exchange.body)
            )
        })?;
    let Some(media) = content.get(&media_type) else {
        let documented: Vec<&String> = content.keys().collect();
        return Err(format!(
            "Content-Type {media_type} is not documented (documented: {documented:?}); body: {}",
            excerpt(&exchange.body)
        ));
    };
    if media_type != "application/json" && !media_type.ends_with("+json") {
        return Ok(());
    }
    let instance: Value = serde_json::from_str(&exchange.body).map_err(|error| {
        format!(
            "the body is not JSON ({error}): {}",
            excerpt(&exchange.body)
        )
    })?;
    let Some(schema) = media.get("schema") else {
        return Ok(());
    };
    let validator = validators
        .entry(format!("{key} {media_type}"))
        .or_insert_with(|| compile(document, schema))
        .as_ref()
        .map_err(Clone::clone)?;
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .map(|error| format!("at '{}': {error}", error.instance_path()))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the body does not match the documented schema: {}; body: {}",
            errors.join("; "),
            excerpt(&exchange.body)
        ))
    }
}

/// A validator for one documented schema: the schema itself with the document's components
/// beside it, so that `#/components/schemas/...` references resolve within it.
fn compile(document: &Value, schema: &Value) -> Result<jsonschema::Validator, String> {
    let mut root = match schema {
        Value::Object(_) => schema.clone(),
        Value::Bool(_) => return Err("boolean schemas are not expected here".to_string()),
        other => return Err(format!("not a schema: {other}")),
    };
    root["components"] = document["components"].clone();
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .map_err(|error| format!("the documented schema does not compile: {error}"))
}
