#![doc = include_str!("../README.md")]

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::quote;
use syn::{Data, DeriveInput, Error, Expr, LitInt, LitStr, Path};

mod case;

use case::RenameRule;

/// Derives `DomainEvent` for an enum in serde's default (externally tagged)
/// representation: `event_type()` answers each variant's serde name,
/// `schema_version()` its `#[event(version = N)]` (the enum's, else 1),
/// `known_version(name)` the same by name, and `EVENT_TYPES` lists the names
/// in variant order. See the crate
/// documentation.
#[proc_macro_derive(DomainEvent, attributes(event))]
pub fn derive_domain_event(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as DeriveInput);
    expand(&input)
        .unwrap_or_else(Error::into_compile_error)
        .into()
}

/// What the attributes on the enum say.
struct EnumAttrs {
    rename_all: Option<RenameRule>,
    version: Option<LitInt>,
    krate: Option<Path>,
}

fn expand(input: &DeriveInput) -> Result<Tokens, Error> {
    let Data::Enum(data) = &input.data else {
        return Err(Error::new(
            input.ident.span(),
            "DomainEvent can only be derived for an enum: its variants are the events",
        ));
    };
    let attrs = enum_attrs(input)?;
    let mut arms = Vec::new();
    let mut versions = Vec::new();
    let mut names = Vec::new();
    let mut known_versions = Vec::new();
    let default_version = match &attrs.version {
        Some(v) => quote!(#v),
        None => quote!(1),
    };
    let mut any_version = attrs.version.is_some();
    for variant in &data.variants {
        let ident = &variant.ident;
        let mut rename = None;
        let mut version = None;
        for attr in &variant.attrs {
            if attr.path().is_ident("serde") {
                attr.parse_nested_meta(|meta| {
                    if meta.path.is_ident("rename") {
                        rename = Some(serialize_name(&meta)?);
                    } else {
                        skip_value(&meta)?;
                    }
                    Ok(())
                })?;
            } else if attr.path().is_ident("event") {
                attr.parse_nested_meta(|meta| {
                    if meta.path.is_ident("version") {
                        version = Some(meta.value()?.parse::<LitInt>()?);
                        Ok(())
                    } else {
                        Err(meta.error("expected `version = N` on a variant"))
                    }
                })?;
            }
        }
        if let Some(version) = &version {
            check_version(version)?;
        }
        let name = match rename {
            Some(name) => name,
            None => {
                let plain = ident.to_string();
                let plain = plain.strip_prefix("r#").unwrap_or(&plain).to_owned();
                attrs
                    .rename_all
                    .map_or(plain.clone(), |rule| rule.apply(&plain))
            }
        };
        let pattern = quote!(Self::#ident { .. });
        arms.push(quote!(#pattern => #name,));
        any_version |= version.is_some();
        let version = version.map_or(default_version.clone(), |v| quote!(#v));
        versions.push(quote!(#pattern => #version,));
        known_versions.push(quote!(#name => ::core::option::Option::Some(#version),));
        names.push(name);
    }
    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let trait_path = match &attrs.krate {
        Some(krate) => quote!(#krate::DomainEvent),
        None => quote!(DomainEvent),
    };
    let event_type = if arms.is_empty() {
        quote!(match *self {})
    } else {
        quote!(match self { #(#arms)* })
    };
    let schema_version = if !any_version {
        Tokens::new()
    } else if versions.is_empty() {
        quote!(
            fn schema_version(&self) -> u32 {
                match *self {}
            }
        )
    } else {
        quote!(fn schema_version(&self) -> u32 { match self { #(#versions)* } })
    };
    Ok(quote! {
        #[automatically_derived]
        impl #impl_generics #trait_path for #name #ty_generics #where_clause {
            const EVENT_TYPES: &'static [&'static str] = &[#(#names),*];

            fn known_version(event_type: &str) -> ::core::option::Option<u32> {
                match event_type {
                    #(#known_versions)*
                    _ => ::core::option::Option::None,
                }
            }

            fn event_type(&self) -> &'static str {
                #event_type
            }
            #schema_version
        }
    })
}

fn enum_attrs(input: &DeriveInput) -> Result<EnumAttrs, Error> {
    let mut attrs = EnumAttrs {
        rename_all: None,
        version: None,
        krate: None,
    };
    for attr in &input.attrs {
        if attr.path().is_ident("serde") {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("rename_all") {
                    let rule = serialize_name(&meta)?;
                    attrs.rename_all =
                        Some(RenameRule::from_str(&rule).ok_or_else(|| {
                            meta.error(format!("unknown rename_all rule {rule:?}"))
                        })?);
                } else if ["tag", "content", "untagged"]
                    .iter()
                    .any(|t| meta.path.is_ident(t))
                {
                    return Err(meta.error(
                        "DomainEvent needs serde's default, externally tagged representation",
                    ));
                } else {
                    skip_value(&meta)?;
                }
                Ok(())
            })?;
        } else if attr.path().is_ident("event") {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("version") {
                    attrs.version = Some(meta.value()?.parse::<LitInt>()?);
                } else if meta.path.is_ident("crate") {
                    let path: LitStr = meta.value()?.parse()?;
                    attrs.krate = Some(path.parse()?);
                } else {
                    return Err(meta.error("expected `version = N` or `crate = \"path\"`"));
                }
                Ok(())
            })?;
        }
    }
    if let Some(version) = &attrs.version {
        check_version(version)?;
    }
    Ok(attrs)
}

/// A version must be a positive `u32`.
fn check_version(version: &LitInt) -> Result<(), Error> {
    match version.base10_parse::<u32>() {
        Ok(v) if v > 0 => Ok(()),
        _ => Err(Error::new(
            version.span(),
            "a schema version is a u32 from 1",
        )),
    }
}

/// The serialize name of `rename = "..."` or
/// `rename(serialize = "...", deserialize = "...")` (also `rename_all`).
fn serialize_name(meta: &syn::meta::ParseNestedMeta<'_>) -> Result<String, Error> {
    if meta.input.peek(syn::Token![=]) {
        let name: LitStr = meta.value()?.parse()?;
        return Ok(name.value());
    }
    let mut name = None;
    meta.parse_nested_meta(|inner| {
        let value: LitStr = inner.value()?.parse()?;
        if inner.path.is_ident("serialize") {
            name = Some(value.value());
        }
        Ok(())
    })?;
    name.ok_or_else(|| meta.error("expected a serialize name"))
}

/// Passes over a serde attribute this derive does not read: `key`,
/// `key = value` or `key(...)`.
fn skip_value(meta: &syn::meta::ParseNestedMeta<'_>) -> Result<(), Error> {
    if meta.input.peek(syn::Token![=]) {
        let _: Expr = meta.value()?.parse()?;
    } else if meta.input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in meta.input);
        let _: Tokens = content.parse()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_str(source: &str) -> Result<String, String> {
        let input: DeriveInput = syn::parse_str(source).map_err(|e| e.to_string())?;
        expand(&input)
            .map(|t| t.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn names_follow_serde_renames() {
        let out = expand_str(
            r#"#[serde(rename_all = "kebab-case")]
               enum E { FirstThing { a: u8 }, #[serde(rename = "Other")] Second(u8), Third }"#,
        )
        .unwrap();
        assert!(
            out.contains(r#"Self :: FirstThing { .. } => "first-thing""#),
            "{out}"
        );
        assert!(out.contains(r#"Self :: Second { .. } => "Other""#), "{out}");
        assert!(out.contains(r#"Self :: Third { .. } => "third""#), "{out}");
        assert!(!out.contains("schema_version"), "{out}");
    }

    #[test]
    fn versions_come_from_the_enum_and_the_variants() {
        let out =
            expand_str(r#"#[event(version = 2)] enum E { A, #[event(version = 5)] B }"#).unwrap();
        assert!(out.contains("Self :: A { .. } => 2"), "{out}");
        assert!(out.contains("Self :: B { .. } => 5"), "{out}");
    }

    #[test]
    fn what_is_not_an_externally_tagged_enum_is_refused() {
        let e = expand_str("struct S;").unwrap_err();
        assert!(e.contains("only be derived for an enum"), "{e}");
        let e = expand_str(r#"#[serde(tag = "type")] enum E { A }"#).unwrap_err();
        assert!(e.contains("externally tagged"), "{e}");
        let e = expand_str(r#"#[event(version = 0)] enum E { A }"#).unwrap_err();
        assert!(e.contains("from 1"), "{e}");
        let e = expand_str(r#"#[serde(rename_all = "Title Case")] enum E { A }"#).unwrap_err();
        assert!(e.contains("unknown rename_all rule"), "{e}");
    }

    #[test]
    fn a_crate_path_names_the_trait() {
        let out = expand_str(r#"#[event(crate = "es")] enum E { A }"#).unwrap();
        assert!(out.contains("impl es :: DomainEvent for E"), "{out}");
    }
}
