//! Parsing of `#[event(...)]` attributes on the enum and its variants.

use proc_macro2::Span;
use quote::ToTokens;
use syn::meta::ParseNestedMeta;
use syn::{Ident, LitStr, Path, Token};

use crate::ctxt::Ctxt;

/// Keys of the enum's `#[event(...)]`.
pub(crate) const ENUM_KEYS: &[&str] = &["kind", "handler", "batch_handler", "emitter", "crate"];
/// Keys of a variant's `#[event(...)]`.
pub(crate) const VARIANT_KEYS: &[&str] = &["name", "alias", "priority", "skip_emit"];
/// The values of a variant's `priority`: the names of `Priority`'s variants.
const PRIORITIES: &[(&str, &str)] = &[("high", "High"), ("normal", "Normal"), ("low", "Low")];

/// The enum-level options.
#[derive(Default)]
pub(crate) struct EnumAttrs {
    /// Name of the generated kind enum.
    pub(crate) kind: Option<Ident>,
    /// Name of the generated handler trait.
    pub(crate) handler: Option<Ident>,
    /// Name of the generated batch handler trait.
    pub(crate) batch_handler: Option<Ident>,
    /// Name of the generated emit-helper trait.
    pub(crate) emitter: Option<Ident>,
    /// Path of the `event_bus` crate.
    pub(crate) krate: Option<Path>,
}

/// A variant's options.
#[derive(Default)]
pub(crate) struct VariantAttrs {
    /// The event name, replacing the dotted snake case default.
    pub(crate) name: Option<LitStr>,
    /// Former names the event is still read under, in order; the key repeats.
    pub(crate) aliases: Vec<LitStr>,
    /// The kind's priority: the `Priority` variant, spanned at the value.
    pub(crate) priority: Option<Ident>,
    /// Leave the variant out of the emit helpers.
    pub(crate) skip_emit: Option<Span>,
}

/// One key's value, remembering that it was set so a second setting is
/// reported as a duplicate.
struct Once<'c, T> {
    cx: &'c Ctxt,
    key: &'static str,
    value: Option<T>,
}

impl<'c, T> Once<'c, T> {
    fn new(cx: &'c Ctxt, key: &'static str) -> Self {
        Self {
            cx,
            key,
            value: None,
        }
    }

    fn set(&mut self, at: &Path, value: T) {
        if self.value.is_some() {
            self.cx
                .error_spanned_by(at, format!("`{}` specified more than once", self.key));
        } else {
            self.value = Some(value);
        }
    }
}

pub(crate) fn enum_attrs(cx: &Ctxt, attrs: &[syn::Attribute]) -> EnumAttrs {
    let mut kind = Once::new(cx, "kind");
    let mut handler = Once::new(cx, "handler");
    let mut batch_handler = Once::new(cx, "batch_handler");
    let mut emitter = Once::new(cx, "emitter");
    let mut krate = Once::new(cx, "crate");
    each_key(cx, attrs, |meta| {
        if meta.path.is_ident("kind") {
            kind.set(&meta.path, ident_value(&meta, "kind", "AppEventKind")?);
        } else if meta.path.is_ident("handler") {
            handler.set(
                &meta.path,
                ident_value(&meta, "handler", "AppEventHandler")?,
            );
        } else if meta.path.is_ident("batch_handler") {
            batch_handler.set(
                &meta.path,
                ident_value(&meta, "batch_handler", "AppEventBatchHandler")?,
            );
        } else if meta.path.is_ident("emitter") {
            emitter.set(&meta.path, ident_value(&meta, "emitter", "EmitAppEvent")?);
        } else if meta.path.is_ident("crate") {
            let lit = string_value(&meta, "crate", "::my_crate::event_bus")?;
            match lit.parse::<Path>() {
                Ok(path) => krate.set(&meta.path, path),
                Err(_) => cx.error_spanned_by(
                    &lit,
                    "`crate` must be a path, like `crate = \"::my_crate::event_bus\"`",
                ),
            }
        } else {
            unknown_key(cx, &meta, ENUM_KEYS, VARIANT_KEYS, "on a variant")?;
        }
        Ok(())
    });
    EnumAttrs {
        kind: kind.value,
        handler: handler.value,
        batch_handler: batch_handler.value,
        emitter: emitter.value,
        krate: krate.value,
    }
}

pub(crate) fn variant_attrs(cx: &Ctxt, attrs: &[syn::Attribute]) -> VariantAttrs {
    let mut name = Once::new(cx, "name");
    let mut priority = Once::new(cx, "priority");
    let mut skip_emit = Once::new(cx, "skip_emit");
    let mut aliases = Vec::new();
    each_key(cx, attrs, |meta| {
        if meta.path.is_ident("name") {
            name.set(&meta.path, string_value(&meta, "name", "user.created")?);
        } else if meta.path.is_ident("alias") {
            aliases.push(string_value(&meta, "alias", "user.registered")?);
        } else if meta.path.is_ident("priority") {
            let lit = string_value(&meta, "priority", "high")?;
            match PRIORITIES.iter().find(|(value, _)| lit.value() == *value) {
                Some((_, variant)) => priority.set(&meta.path, Ident::new(variant, lit.span())),
                None => cx
                    .error_spanned_by(&lit, "`priority` is one of \"high\", \"normal\" or \"low\""),
            }
        } else if meta.path.is_ident("skip_emit") {
            if meta.input.peek(Token![=]) {
                return Err(meta.error("`skip_emit` takes no value; write `#[event(skip_emit)]`"));
            }
            skip_emit.set(&meta.path, meta.path.segments[0].ident.span());
        } else {
            unknown_key(cx, &meta, VARIANT_KEYS, ENUM_KEYS, "on the enum")?;
        }
        Ok(())
    });
    VariantAttrs {
        name: name.value,
        aliases,
        priority: priority.value,
        skip_emit: skip_emit.value,
    }
}

/// Calls `parse_key` for each key of every `#[event(...)]` in `attrs`.
fn each_key(
    cx: &Ctxt,
    attrs: &[syn::Attribute],
    mut parse_key: impl FnMut(ParseNestedMeta<'_>) -> syn::Result<()>,
) {
    for attr in attrs.iter().filter(|a| a.path().is_ident("event")) {
        if let Err(error) = attr.parse_nested_meta(&mut parse_key) {
            cx.syn_error(error);
        }
    }
}

/// Reports an unknown key, naming the keys that exist here, or where the key
/// belongs when it exists at the other level. Consumes the key's value so
/// parsing goes on to the next key and every mistake is reported at once.
fn unknown_key(
    cx: &Ctxt,
    meta: &ParseNestedMeta<'_>,
    known: &[&str],
    elsewhere: &[&str],
    elsewhere_place: &str,
) -> syn::Result<()> {
    let key = meta
        .path
        .get_ident()
        .map_or_else(|| meta.path.to_token_stream().to_string(), Ident::to_string);
    let message = if elsewhere.contains(&key.as_str()) {
        format!("`{key}` belongs {elsewhere_place}, not here")
    } else {
        let known: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
        format!(
            "unknown `event` attribute key `{key}`; expected one of {}",
            known.join(", ")
        )
    };
    cx.error_spanned_by(&meta.path, message);
    if meta.input.peek(Token![=]) {
        meta.value()?.parse::<syn::Expr>()?;
    } else if meta.input.peek(syn::token::Paren) {
        meta.parse_nested_meta(|nested| {
            if nested.input.peek(Token![=]) {
                nested.value()?.parse::<syn::Expr>()?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn string_value(meta: &ParseNestedMeta<'_>, key: &str, example: &str) -> syn::Result<LitStr> {
    let value = meta.value()?;
    value.parse::<LitStr>().map_err(|error| {
        syn::Error::new(
            error.span(),
            format!("`{key}` takes a string, like `{key} = \"{example}\"`"),
        )
    })
}

fn ident_value(meta: &ParseNestedMeta<'_>, key: &str, example: &str) -> syn::Result<Ident> {
    let lit = string_value(meta, key, example)?;
    lit.parse::<Ident>().map_err(|_| {
        syn::Error::new(
            lit.span(),
            format!("`{key}` must name a type, like `{key} = \"{example}\"`"),
        )
    })
}
