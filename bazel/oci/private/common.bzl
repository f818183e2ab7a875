"""Helpers shared by the OCI rules."""

def layout_dir(target):
    """The OCI layout directory among an oci_image's or oci_image_index's outputs."""
    return [f for f in target[DefaultInfo].files.to_list() if f.is_directory][0]
