//! The discus API (`discus.dev/v1alpha1`): the three custom resources, their status, and the
//! value types and rules behind them. No I/O happens here.

// Each `printcolumn(...)` of kube's derive names its own `type_`; clippy reads the repeats as one
// attribute given twice.
#![allow(clippy::duplicated_attributes)]

pub mod chap;
pub mod disc_image;
pub mod field;
pub mod initiator_access;
pub mod iscsi_target;
pub mod mac;
pub mod quantity;
pub mod rules;
pub mod schema;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::CustomResourceExt;
use kube::core::Selector;

pub use disc_image::{DiscImage, DiscImageSpec, DiscImageStatus};
pub use field::{FieldError, FieldErrors, FieldPath, printable};
pub use initiator_access::{InitiatorAccess, InitiatorAccessSpec, InitiatorAccessStatus};
pub use iscsi_target::{IscsiTarget, IscsiTargetSpec, IscsiTargetStatus};

pub const GROUP: &str = "discus.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "discus.dev/v1alpha1";

/// Every CRD of the API, in a stable order.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![DiscImage::crd(), IscsiTarget::crd(), InitiatorAccess::crd()]
}

/// Checks a label selector and turns it into one that can match labels.
fn label_selector(
    selector: Option<&LabelSelector>,
    path: &FieldPath,
    errors: &mut FieldErrors,
) -> Option<Selector> {
    let selector = selector?;
    let expressions = path.child("matchExpressions");
    for (i, requirement) in selector.match_expressions.iter().flatten().enumerate() {
        let path = expressions.index(i);
        let values = requirement.values.as_ref().map_or(0, Vec::len);
        match requirement.operator.as_str() {
            "In" | "NotIn" if values == 0 => errors.push(
                path.child("values"),
                "must not be empty for operators In and NotIn",
            ),
            "Exists" | "DoesNotExist" if values > 0 => errors.push(
                path.child("values"),
                "must be empty for operators Exists and DoesNotExist",
            ),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            _ => errors.push(
                path.child("operator"),
                "must be one of In, NotIn, Exists or DoesNotExist",
            ),
        }
    }
    Selector::try_from(selector.clone()).ok()
}
