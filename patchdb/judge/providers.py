"""Which provider a judge URL points at: the one rule behind the key a request carries, the
reasoning field it is sent with, and what `judge --batch` refuses.

A URL is a provider's only when it is https and its host part is exactly the provider's host
(any case, optionally with port 443): no userinfo, no other port, no trailing dot, no
whitespace or control character anywhere. The provider's name in the path, the query, a
subdomain of another host, userinfo, plain http or a look-alike letter make another server,
which never gets the provider's key.
"""

from urllib.parse import urlsplit

OPENAI = "openai"
OPENROUTER = "openrouter"
HOSTS = {"api.openai.com": OPENAI, "openrouter.ai": OPENROUTER}
KEY_VARS = {OPENAI: "OPENAI_API_KEY", OPENROUTER: "OPENROUTER_API_KEY"}
NAMES = {OPENAI: "OpenAI", OPENROUTER: "OpenRouter"}
DEFAULT_URLS = {OPENROUTER: "https://openrouter.ai/api/v1", OPENAI: "https://api.openai.com/v1"}


# The prefixes by which a provider's own keys are known (OpenAI's project, service-account and
# admin keys; every OpenRouter key). A plain "sk-" says nothing: local servers use it too.
KEY_PREFIXES = {OPENROUTER: ("sk-or-",), OPENAI: ("sk-proj-", "sk-svcacct-", "sk-admin-")}


def key_owner(key: str | None) -> str | None:
    """OPENAI or OPENROUTER when `key` looks like that provider's own key, else None."""
    for name, prefixes in KEY_PREFIXES.items():
        if key and key.startswith(prefixes):
            return name
    return None


def provider_of(url: str | None) -> str | None:
    """OPENAI or OPENROUTER when `url` is that provider's own https host, else None."""
    if not url or any(ch.isspace() or not ch.isprintable() for ch in url):
        return None  # urllib drops tabs and newlines that an HTTP client may read otherwise
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    host, _, port = parts.netloc.lower().partition(":")
    if parts.scheme.lower() != "https" or port not in ("", "443"):
        return None
    return HOSTS.get(host)  # userinfo, brackets or a trailing dot make the host unequal
