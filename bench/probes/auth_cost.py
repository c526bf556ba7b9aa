"""Per-request cost of basic auth against an AuthSession cookie: 5 x 300 GET /idx50k on one
keep-alive connection, alternating (issue 17). Usage: auth_cost.py PORT PASSWORD_FILE
(user admin; the cookie and password are never printed)."""
import base64, http.client, json, sys, time
port, pw = int(sys.argv[1]), open(sys.argv[2]).read().strip()
basic = "Basic " + base64.b64encode(("admin:" + pw).encode()).decode()
def conn(): return http.client.HTTPConnection("127.0.0.1", port)
c = conn()
c.request("POST", "/_session", body=json.dumps({"name": "admin", "password": pw}),
          headers={"Content-Type": "application/json"})
r = c.getresponse(); r.read()
cookie = r.getheader("Set-Cookie").split(";", 1)[0]
def run(headers, n=300):
    t = time.perf_counter()
    for _ in range(n):
        c.request("GET", "/idx50k", headers=headers); r = c.getresponse(); r.read()
        assert r.status == 200, r.status
    return (time.perf_counter() - t) / n * 1000
res = {"basic": [], "cookie": []}
for _ in range(5):
    res["basic"].append(run({"Authorization": basic}))
    res["cookie"].append(run({"Cookie": cookie}))
print({k: [round(x, 2) for x in v] for k, v in res.items()})
