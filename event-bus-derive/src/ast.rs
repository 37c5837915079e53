//! The derive's input, parsed into borrowed types.

use proc_macro2::Span;
use syn::{Data, DeriveInput, Fields, Ident, Type, Visibility};

use crate::attr::{self, EnumAttrs, VariantAttrs};
use crate::case;
use crate::ctxt::Ctxt;

pub(crate) struct Input<'a> {
    pub(crate) original: &'a DeriveInput,
    pub(crate) ident: &'a Ident,
    pub(crate) vis: &'a Visibility,
    pub(crate) attrs: EnumAttrs,
    pub(crate) variants: Vec<Variant<'a>>,
}

pub(crate) struct Variant<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) attrs: VariantAttrs,
    pub(crate) shape: Shape<'a>,
}

/// What a variant carries.
pub(crate) enum Shape<'a> {
    /// `CacheFlushed`
    Unit,
    /// `UserCreated(UserEventData)`
    Newtype(&'a Type),
    /// `UserDeleted { id: i64 }`
    Struct(Vec<(&'a Ident, &'a Type)>),
    /// `Moved(A, B)`: rejected by validation.
    Tuple(&'a Fields),
}

impl<'a> Input<'a> {
    /// `None` when the input is not an enum (reported into `cx`).
    pub(crate) fn from_syn(cx: &Ctxt, input: &'a DeriveInput) -> Option<Self> {
        let data = match &input.data {
            Data::Enum(data) => data,
            Data::Struct(data) => {
                cx.error_spanned_by(
                    data.struct_token,
                    "`DomainEvent` can only be derived for enums; wrap the struct in an enum variant, like `enum AppEvent { UserCreated(UserCreated) }`",
                );
                return None;
            }
            Data::Union(data) => {
                cx.error_spanned_by(
                    data.union_token,
                    "`DomainEvent` can only be derived for enums; a union cannot be an event",
                );
                return None;
            }
        };
        let variants = data
            .variants
            .iter()
            .map(|variant| Variant {
                ident: &variant.ident,
                attrs: attr::variant_attrs(cx, &variant.attrs),
                shape: Shape::from_fields(&variant.fields),
            })
            .collect();
        Some(Self {
            original: input,
            ident: &input.ident,
            vis: &input.vis,
            attrs: attr::enum_attrs(cx, &input.attrs),
            variants,
        })
    }

    pub(crate) fn kind_ident(&self) -> Ident {
        self.attrs
            .kind
            .clone()
            .unwrap_or_else(|| self.suffixed("Kind"))
    }

    pub(crate) fn handler_ident(&self) -> Ident {
        self.attrs
            .handler
            .clone()
            .unwrap_or_else(|| self.suffixed("Handler"))
    }

    pub(crate) fn batch_handler_ident(&self) -> Ident {
        self.attrs
            .batch_handler
            .clone()
            .unwrap_or_else(|| self.suffixed("BatchHandler"))
    }

    pub(crate) fn emitter_ident(&self) -> Ident {
        self.attrs
            .emitter
            .clone()
            .unwrap_or_else(|| Ident::new(&format!("Emit{}", self.ident), self.ident.span()))
    }

    fn suffixed(&self, suffix: &str) -> Ident {
        Ident::new(&format!("{}{suffix}", self.ident), self.ident.span())
    }
}

impl<'a> Shape<'a> {
    fn from_fields(fields: &'a Fields) -> Self {
        match fields {
            Fields::Unit => Shape::Unit,
            Fields::Unnamed(unnamed) if unnamed.unnamed.len() == 1 => {
                Shape::Newtype(&unnamed.unnamed[0].ty)
            }
            Fields::Unnamed(_) => Shape::Tuple(fields),
            Fields::Named(named) => Shape::Struct(
                named
                    .named
                    .iter()
                    .filter_map(|f| f.ident.as_ref().map(|ident| (ident, &f.ty)))
                    .collect(),
            ),
        }
    }
}

impl Variant<'_> {
    /// The event name: `#[event(name = "…")]`, or the dotted snake case of
    /// the variant.
    pub(crate) fn name(&self) -> String {
        match &self.attrs.name {
            Some(name) => name.value(),
            None => case::dotted(&self.ident.to_string()),
        }
    }

    /// Where errors about the name point.
    pub(crate) fn name_span(&self) -> Span {
        match &self.attrs.name {
            Some(name) => name.span(),
            None => self.ident.span(),
        }
    }

    /// `user_created`, the stem of `on_user_created` and `emit_user_created`.
    pub(crate) fn snake(&self) -> String {
        case::snake_case(&self.ident.to_string())
    }
}
