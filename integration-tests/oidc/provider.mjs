// A real OpenID provider (oidc-provider, OpenID certified) for the end-to-end tests: one
// realm per tenant, Keycloak-shaped (`http://127.0.0.1:PORT/realms/<tenant>`), each with
// discovery, a JWKS and client-credentials grants that yield JWT access tokens (RFC 9068)
// for a resource indicator, carrying a `user_id` claim like FOLIO Eureka's tokens.
//
// Environment:
//   PORT       the port to listen on (127.0.0.1)
//   TENANTS    comma-separated realm names, e.g. "diku,college"
//   KEYS_FILE  JSON file of the private signing keys ({"keys": [JWK…]}); created if missing
//   ROTATE     "1": add a new signing key in front (it signs), keep the old ones (they
//              still verify), and write the file back: Keycloak's active/passive rotation
//   CLIENTS    JSON {"<client_id>": {"secret": "…", "user_id": "…", "sid": "…"}}: `sid`
//              (optional) is put in the client's access tokens as their session
//
// Besides each realm, `GET /logout-token/<tenant>?aud=<client>&sub=…&sid=…` answers a
// back-channel logout token (OpenID Connect Back-Channel Logout 1.0) that the realm signs
// for client `aud`, made the way oidc-provider makes the ones it sends itself; tests post
// it to the service (and replay or alter it).
//   RESOURCE   the resource indicator (and `aud` of the access tokens)
//   TLS_CERT, TLS_KEY  PEM files: serve HTTPS with them (the issuers are then https://…)
//
// Prints "ready <port>" on stdout once listening.
import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import Provider from 'oidc-provider';

const port = Number(process.env.PORT);
const tenants = (process.env.TENANTS || 'diku').split(',');
const keysFile = process.env.KEYS_FILE;
const clients = JSON.parse(process.env.CLIENTS || '{}');
const resource = process.env.RESOURCE || 'https://jobtoken.example.org';
const tls = process.env.TLS_CERT
  ? { cert: readFileSync(process.env.TLS_CERT), key: readFileSync(process.env.TLS_KEY) }
  : null;
const scheme = tls ? 'https' : 'http';

function newKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'RS256', use: 'sig' };
}

let keys = existsSync(keysFile) ? JSON.parse(readFileSync(keysFile, 'utf8')).keys : [newKey()];
if (process.env.ROTATE === '1') keys = [newKey(), ...keys];
writeFileSync(keysFile, JSON.stringify({ keys }));

const mounts = new Map();
const providers = new Map();
for (const tenant of tenants) {
  const issuer = `${scheme}://127.0.0.1:${port}/realms/${tenant}`;
  const provider = new Provider(issuer, {
    jwks: { keys },
    ttl: { ClientCredentials: 300 },
    clients: Object.entries(clients).map(([id, c]) => ({
      client_id: id,
      client_secret: c.secret,
      grant_types: ['client_credentials'],
      redirect_uris: [],
      response_types: [],
    })),
    features: {
      backchannelLogout: { enabled: true },
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => resource,
        getResourceServerInfo: () => ({
          scope: 'api',
          audience: resource,
          accessTokenTTL: 300,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
    extraTokenClaims: (_ctx, token) => ({
      user_id: clients[token.clientId]?.user_id,
      sid: clients[token.clientId]?.sid,
    }),
  });
  mounts.set(`/realms/${tenant}`, provider.callback());
  providers.set(tenant, provider);
}

// As oidc-provider's Client#backchannelLogout builds the token it posts.
async function logoutToken(tenant, params) {
  const provider = providers.get(tenant);
  const client = provider && (await provider.Client.find(params.get('aud')));
  if (!client) return null;
  const token = new provider.IdToken({ sub: params.get('sub') || undefined }, { client, ctx: undefined });
  token.mask = { sub: null };
  token.set('events', { 'http://schemas.openid.net/event/backchannel-logout': {} });
  token.set('jti', randomUUID());
  if (params.get('sid')) token.set('sid', params.get('sid'));
  return token.issue({ use: 'logout' });
}

const handler = (req, res) => {
  const url = new URL(req.url, 'http://localhost');
  if (url.pathname.startsWith('/logout-token/')) {
    logoutToken(url.pathname.slice('/logout-token/'.length), url.searchParams).then(
      (token) => {
        res.statusCode = token ? 200 : 404;
        res.end(token || '');
      },
      (err) => {
        res.statusCode = 500;
        res.end(String(err));
      },
    );
    return;
  }
  for (const [prefix, handle] of mounts) {
    if (req.url === prefix || req.url.startsWith(`${prefix}/`)) {
      req.originalUrl = req.url;
      req.url = req.url.slice(prefix.length) || '/';
      return handle(req, res);
    }
  }
  res.statusCode = 404;
  res.end();
};
const server = tls ? https.createServer(tls, handler) : http.createServer(handler);
server.listen(port, '127.0.0.1', () => console.log(`ready ${server.address().port}`));
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => server.close(() => process.exit(0)));
