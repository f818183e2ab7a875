"""`bazel run` an oci_push target: pushes an image or image index over the OCI distribution API.

    bazel run //:push -- --repository registry.example.com/team/token-resource --tag v0.1.0

Blobs go first (skipped when the registry has them), then each platform's manifest by digest,
then the top manifest by digest and under every tag. Plain HTTP is used for localhost and
127.0.0.1 (or with --plain_http); elsewhere HTTPS. Credentials, if the registry asks for them,
come from the usual auth files: $REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json,
~/.docker/config.json.
"""

import argparse
import http.client
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import IO

from bazel.oci import layout as oci

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def auth_files() -> list[str]:
    files = [os.environ.get("REGISTRY_AUTH_FILE", "")]
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(os.path.join(os.environ["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    files.append(os.path.expanduser("~/.docker/config.json"))
    return [f for f in files if f and os.path.exists(f)]


def basic_credentials(host: str) -> str | None:
    for path in auth_files():
        with open(path) as f:
            auths = json.load(f).get("auths", {})
        for key, value in auths.items():
            if re.sub(r"^https?://", "", key).split("/")[0] == host and value.get("auth"):
                return value["auth"]
    return None


class Registry:
    def __init__(self, repository: str, plain_http: bool) -> None:
        self.host, _, self.name = repository.partition("/")
        if not self.name or ("." not in self.host and ":" not in self.host and self.host != "localhost"):
            raise oci.OciError(f"oci_push: repository {repository!r} must start with a registry host")
        scheme = (
            "http" if plain_http or self.host.split(":")[0] in LOCAL_HOSTS or self.host.startswith("[::1]") else "https"
        )
        self.base = f"{scheme}://{self.host}"
        self.authorization: str | None = None

    def _authenticate(self, challenge: str) -> None:
        scheme, _, params = challenge.partition(" ")
        basic = basic_credentials(self.host)
        if scheme.lower() == "basic":
            if not basic:
                raise oci.OciError(f"oci_push: {self.host} wants a login and no auth file has one")
            self.authorization = "Basic " + basic
            return
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        query = {"service": fields.get("service", ""), "scope": f"repository:{self.name}:pull,push"}
        request = urllib.request.Request(fields["realm"] + "?" + urllib.parse.urlencode(query))
        if basic:
            request.add_header("Authorization", "Basic " + basic)
        with urllib.request.urlopen(request, timeout=60) as response:
            token = json.load(response)
        self.authorization = "Bearer " + (token.get("token") or token["access_token"])

    def request(
        self,
        method: str,
        url: str,
        data: bytes | IO[bytes] | None = None,
        headers: dict[str, str] | None = None,
        retry: bool = True,
    ) -> http.client.HTTPResponse | None:
        """The response; None for a HEAD that finds nothing (404)."""
        url = urllib.parse.urljoin(self.base, url)
        request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        if self.authorization:
            request.add_header("Authorization", self.authorization)
        try:
            return urllib.request.urlopen(request, timeout=600)
        except urllib.error.HTTPError as error:
            if error.code == 401 and retry and "WWW-Authenticate" in error.headers:
                self._authenticate(error.headers["WWW-Authenticate"])
                if data is not None and not isinstance(data, bytes):
                    data.seek(0)
                return self.request(method, url, data, headers, retry=False)
            if method == "HEAD" and error.code == 404:
                return None
            body = error.read().decode(errors="replace")[:500]
            raise oci.OciError(f"oci_push: {method} {url}: HTTP {error.code} {body}") from None

    def has_blob(self, digest: str) -> bool:
        response = self.request("HEAD", f"/v2/{self.name}/blobs/{digest}")
        return response is not None and response.status == 200

    def upload(self, path: str, digest: str, size: int) -> None:
        response = self.request("POST", f"/v2/{self.name}/blobs/uploads/", data=b"")
        assert response is not None  # only HEAD gives None
        location = urllib.parse.urljoin(response.url, response.headers["Location"])
        location += ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})
        with open(path, "rb") as f:
            self.request(
                "PUT",
                location,
                data=f,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            )

    def put_manifest(self, reference: str, data: bytes, media_type: str) -> None:
        self.request("PUT", f"/v2/{self.name}/manifests/{reference}", data=data, headers={"Content-Type": media_type})


def push(image_dir: str, repository: str, tags: list[str], plain_http: bool = False, quiet: bool = False) -> str:
    image = oci.Layout(image_dir)
    top = image.top()
    registry = Registry(repository, plain_http)
    for descriptor in image.blobs_of(top):
        path = image.blob_path(descriptor["digest"])
        if descriptor["mediaType"] in (*oci.INDEX_TYPES, oci.MANIFEST, oci.DOCKER_MANIFEST):
            with open(path, "rb") as f:
                registry.put_manifest(descriptor["digest"], f.read(), descriptor["mediaType"])
        elif not registry.has_blob(descriptor["digest"]):
            registry.upload(path, descriptor["digest"], descriptor["size"])
        elif not quiet:
            print(f"oci_push: {descriptor['digest'][:19]} already there")
    with open(image.blob_path(top["digest"]), "rb") as f:
        data = f.read()
    for tag in tags:
        registry.put_manifest(tag, data, top["mediaType"])
    if not quiet:
        print(
            f"oci_push: pushed {repository}@{top['digest']}"
            + "".join(f"\noci_push: tagged {repository}:{t}" for t in tags)
        )
    return top["digest"]


def main(argv: list[str] | None = None) -> None:
    parser = oci.tool_parser(__doc__)
    parser.add_argument("--repository", "-r", help="registry host[:port]/name")
    parser.add_argument(
        "--tag", "-t", action="append", default=[], help="tag to set (repeatable); replaces the target's remote_tags"
    )
    parser.add_argument("--default_repository", help=argparse.SUPPRESS)
    parser.add_argument("--default_tag", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--plain_http", action="store_true", help="HTTP instead of HTTPS for any host")
    parser.add_argument("--digest_file", help="also write the pushed digest here")
    args = parser.parse_args(argv)
    repository = args.repository or args.default_repository
    if not repository:
        sys.exit("oci_push: no repository: pass --repository HOST/NAME")
    try:
        digest = push(args.image, repository, args.tag or args.default_tag, args.plain_http)
    except oci.OciError as error:
        sys.exit(str(error))
    if args.digest_file:
        with open(args.digest_file, "w") as f:
            f.write(digest)


if __name__ == "__main__":
    main()
