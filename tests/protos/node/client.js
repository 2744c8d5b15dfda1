// A stepscore client in Node.js: unary Score, then a ScoreStream whose answers arrive out of order.
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

client.Score(request, (err, res) => {
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
  stream.on("end", () => client.close());
  stream.write({ ...request, request_id: "s1" });
  stream.write({ ...request, request_id: "s2", candidates: [steps("2+3=5.")] });
  stream.write({ ...request, request_id: "s3", candidates: [steps("word ".repeat(400))] }); // too long: an in-stream error
});
