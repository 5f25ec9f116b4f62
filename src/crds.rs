//! The CRDs as the YAML that `discus crds` prints and `crds/` holds.

use crate::api;

#[derive(Debug, thiserror::Error)]
#[error("cannot render the CRDs as YAML: {0}")]
pub struct RenderError(#[from] serde_saphyr::ser_error::Error);

/// All CRDs as one multi-document YAML stream.
pub fn render_yaml() -> Result<String, RenderError> {
    let mut out = String::new();
    for crd in api::all_crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
