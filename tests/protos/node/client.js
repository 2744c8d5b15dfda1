// A stepscore client in Node.js: unary Score as part of a search, then a ScoreStream whose answers arrive out
// of order, then the search's next call (its earlier steps come from the server's prefix cache) and EndSearch.
// Usage: node client.js HOST:PORT PROTO_DIR   (prints one JSON line per answer)
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [target, protoDir] = process.argv.slice(2);
const def = loader.loadSync("stepscore/v1/stepscore.proto", { includeDirs: [protoDir], keepCase: true, defaults: true, oneofs: true });
const { StepScorer } = grpc.loadPackageDefinition(def).stepscore.v1;
const client = new StepScorer(target, grpc.credentials.createInsecure());

const steps = (...s) => ({ steps: { steps: s } });
const request = {
  request_id: "unary-1",
  problem: "What is (2+3)*4?",
  candidates: [steps("2+3=5.", "5*4=20."), steps("2+3=6.", "6*4=24.")],
  aggregates: ["min", "last"],
};
// A search names itself in the request and in this header: replicas behind a load balancer route by the
// header, so every call of the search reaches the replica whose prefix cache holds its earlier steps.
const searchId = "node-search-1";
const searchMeta = new grpc.Metadata();
searchMeta.set("x-stepscore-search-id", searchId);

function nextCallAndEnd() {
  const next = { ...request, request_id: "unary-2", search_id: searchId,
                 candidates: [steps("2+3=5.", "5*4=20.", "The answer is 20.")] };
  client.Score(next, searchMeta, (err, res) => {
    if (err) throw err;
    console.log(JSON.stringify({ rpc: "Score", request_id: res.request_id, candidates: res.candidates }));
    client.EndSearch({ search_id: searchId }, searchMeta, (err2, ended) => {
      if (err2) throw err2;
      console.log(JSON.stringify({ rpc: "EndSearch", freed_bytes: Number(ended.freed_bytes) }));
      client.close();
    });
  });
}

client.Score({ ...request, search_id: searchId }, searchMeta, (err, res) => {
  if (err) throw err;
  console.log(JSON.stringify({ rpc: "Score", request_id: res.request_id, candidates: res.candidates }));

  const stream = client.ScoreStream();
  let answers = 0;
  stream.on("data", (msg) => {
    console.log(JSON.stringify({ rpc: "ScoreStream", request_id: msg.request_id, result: msg.result,
                                 error: msg.error || null, candidates: msg.response ? msg.response.candidates : null }));
    if (++answers === 3) stream.end();
  });
  stream.on("error", (e) => { console.error(e.message); process.exit(1); });
  stream.on("end", nextCallAndEnd);
  stream.write({ ...request, request_id: "s1" });
  stream.write({ ...request, request_id: "s2", candidates: [steps("2+3=5.")] });
  stream.write({ ...request, request_id: "s3", candidates: [steps("word ".repeat(400))] }); // too long: an in-stream error
});
