// Inspects a TorchScript archive WITHOUT running any of it: compiles every
// class and function the archive's pickles name, exactly as libtorch's own
// loader does, but with an object loader that never calls `__setstate__`
// (torch::jit::load runs it while loading), then lists every operator of
// every compiled function. The policy (which operators may run)
// is applied by the Rust side (src/model/torch/inspect.rs).
//
// Every function the archive compiles to is walked as it is (not inlined:
// inlining a few kilobytes of functions that call each other twice grows
// exponentially; every callee is itself one of the functions walked).
// Before compiling, the code's nesting is bounded (the TorchScript parser
// recurses per bracket and indentation level).
//
// Report, one entry per line:
//   O <function>\t<operator kind>    an operator a function's graph uses
//   P <problem>                      a reason to refuse regardless of operators
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/csrc/jit/mobile/file_format.h>
#include <torch/csrc/jit/serialization/import_read.h>
#include <torch/csrc/jit/serialization/import_source.h>
#include <caffe2/serialize/in_memory_adapter.h>
#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <cstring>
#include <set>
#include <unordered_map>
#include <string>

using namespace torch::jit;
using caffe2::serialize::PyTorchStreamReader;

namespace {

const char* const kCustomClassPrefix = "__torch__.torch.classes.";

bool is_custom_class(const c10::TypePtr& t) {
  if (auto ct = t->cast<c10::ClassType>()) {
    auto n = ct->name();
    return n && n->qualifiedName().rfind(kCustomClassPrefix, 0) == 0;
  }
  return false;
}

// A C++ custom class anywhere inside a type (List[...], Optional[...], ...);
// a scripted class's own attributes are checked where they are read.
bool contains_custom_class(const c10::TypePtr& t) {
  if (is_custom_class(t)) return true;
  if (t->cast<c10::ClassType>()) return false;
  for (const auto& c : t->containedTypes())
    if (contains_custom_class(c)) return true;
  return false;
}

// Whether a value of type `t` holds objects whose layout libtorch reads
// unchecked: class instances (slots by index), interfaces, tuples.
bool holds_layout(const c10::TypePtr& t) {
  if (t->cast<c10::ClassType>() || t->cast<c10::InterfaceType>() || t->cast<c10::TupleType>())
    return true;
  for (const auto& c : t->containedTypes())
    if (holds_layout(c)) return true;
  return false;
}

struct Report {
  std::set<std::string> ops;       // "function\tkind"
  std::set<std::string> problems;
  std::vector<std::string> sizes;  // "function\tnodes once inlined"
  size_t nodes = 0;
};

// Most graph nodes walked in all; a bigger archive is refused.
const size_t kMaxNodes = 5000000;
// Deepest bracket nesting and indentation (columns) in the code.
const size_t kMaxBrackets = 200;
const size_t kMaxIndent = 800;
// longest statement, in characters; most `elif` branches in one file
const size_t kMaxLogicalLine = 16384;
const size_t kMaxElifs = 1000;
// Most bytes of code in all.
const size_t kMaxCodeBytes = 64u << 20;

void walk(const Block* b, const std::string& fn, Report& r) {
  for (const Node* n : b->nodes()) {
    if (++r.nodes > kMaxNodes)
      throw std::runtime_error("the archive's code has more than 5,000,000 graph nodes");
    std::string k = n->kind().toQualString();
    r.ops.insert(fn + "\t" + k);
    // an unchecked cast must only narrow (Optional[T] to T, a union to a
    // member): casting an object to an unrelated class reads past its
    // attribute slots (libtorch checks them only in debug builds)
    if (n->kind() == prim::unchecked_cast && n->inputs().size() == 1 && n->outputs().size() == 1) {
      const auto& from = n->input()->type();
      const auto& to = n->output()->type();
      // a narrowing of Any, a union or an interface to an object type is
      // still a guess at the object's layout: only Optional[T] to T is safe
      auto opt = from->cast<c10::OptionalType>();
      bool unwraps_optional = opt && *opt->getElementType() == *to;
      if (!to->isSubtypeOf(*from) || (holds_layout(to) && !unwraps_optional && *from != *to))
        r.problems.insert(fn + ": prim::unchecked_cast from " + from->repr_str() + " to " +
                          to->repr_str() + " is not a narrowing (type confusion)");
    }
    for (const Value* v : n->outputs())
      if (contains_custom_class(v->type()))
        r.problems.insert(fn + ": " + k + " yields the C++ custom class " + v->type()->repr_str());
    for (const Value* v : n->inputs())
      if (contains_custom_class(v->type()))
        r.problems.insert(fn + ": " + k + " takes the C++ custom class " + v->type()->repr_str());
    for (const Block* sub : n->blocks()) walk(sub, fn, r);
  }
}

// Most graph nodes a function may expand to once its calls are inlined, as
// libtorch's executor does when it first runs the function.
const uint64_t kMaxInlinedNodes = 200000;

// The function a call node calls, when it can be known statically.
Function* callee(const Node* n) {
  if (n->kind() == prim::CallFunction && n->inputs().size() > 0) {
    if (auto ft = n->input(0)->type()->cast<c10::FunctionType>()) return ft->function();
  } else if (n->kind() == prim::CallMethod && n->inputs().size() > 0 && n->hasAttribute(attr::name)) {
    if (auto cls = n->input(0)->type()->cast<c10::ClassType>())
      return cls->findMethod(n->s(attr::name));
  }
  return nullptr;
}

// Nodes of `b` with every statically known call expanded (memoised, so a
// function that calls another twice, n levels deep, costs n steps to
// measure, not 2^n), saturating past the limit.
uint64_t expanded(const Block* b, std::unordered_map<const Function*, uint64_t>& memo, int depth);

uint64_t expanded(Function* fn, std::unordered_map<const Function*, uint64_t>& memo, int depth) {
  if (!fn || !fn->isGraphFunction()) return 1;
  auto it = memo.find(fn);
  if (it != memo.end()) return it->second;
  if (depth > 256) return kMaxInlinedNodes + 1;  // recursion (not valid TorchScript)
  memo[fn] = kMaxInlinedNodes + 1;                // while measuring: a cycle is too big
  uint64_t n = expanded(toGraphFunction(*fn).graph()->block(), memo, depth + 1);
  memo[fn] = n;
  return n;
}

uint64_t expanded(const Block* b, std::unordered_map<const Function*, uint64_t>& memo, int depth) {
  uint64_t total = 0;
  for (const Node* n : b->nodes()) {
    total += 1;
    if (Function* f = callee(n)) total += expanded(f, memo, depth);
    for (const Block* sub : n->blocks()) total += expanded(sub, memo, depth);
    if (total > kMaxInlinedNodes) return kMaxInlinedNodes + 1;
  }
  return total;
}

// Refuses code nested deeper than the parser should recurse.
void check_nesting(const char* p, size_t n, const std::string& name) {
  size_t depth = 0, indent = 0, logical = 0, elifs = 0;
  bool line_start = true;
  for (size_t i = 0; i < n; ++i) {
    char c = p[i];
    // a logical line (a statement; newlines inside brackets continue it):
    // a long chain of operators in one expression is parsed and compiled
    // recursively, one stack frame per operator
    if (++logical > kMaxLogicalLine)
      throw std::runtime_error(name + ": a statement longer than 16384 characters");
    if (c == '\n') {
      line_start = true;
      indent = 0;
      if (depth == 0) logical = 0;
      continue;
    }
    if (line_start) {
      if (c == ' ' || c == '\t') {
        if (++indent > kMaxIndent)
          throw std::runtime_error(name + ": code indented deeper than 800 columns");
        continue;
      }
      line_start = false;
      // each `elif` nests the rest of its chain one level deeper
      if (n - i > 4 && std::memcmp(p + i, "elif", 4) == 0 && (p[i + 4] == ' ' || p[i + 4] == '(') &&
          ++elifs > kMaxElifs)
        throw std::runtime_error(name + ": more than 1000 `elif` branches");
    }
    if (c == '(' || c == '[' || c == '{') {
      if (++depth > kMaxBrackets)
        throw std::runtime_error(name + ": brackets nested deeper than 200");
    } else if ((c == ')' || c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
}

// Compiles everything the archive's pickles name, as ScriptModuleDeserializer
// does, with an object loader that never runs __setstate__.
std::shared_ptr<CompilationUnit> compile_only(const char* data, size_t len, Report& r) {
  // the test torch::jit::load makes: flatbuffer files (which run
  // __setstate__ bytecode while loading) are refused
  if (len < 8 || getFileFormat(data) != FileFormat::ZipFileFormat)
    throw std::runtime_error("not a TorchScript zip archive (flatbuffer and other formats are refused)");
  auto rai = std::make_shared<caffe2::serialize::MemoryReadAdapter>(data, len);
  auto reader = std::make_shared<PyTorchStreamReader>(rai);
  size_t code_bytes = 0;
  for (const auto& rec : reader->getAllRecords()) {
    if (rec == "model.json" || rec.rfind(".data/ts_code/", 0) == 0)
      throw std::runtime_error("a legacy or torch.package archive (" + rec + "), not TorchScript");
    if (rec.rfind("code/", 0) == 0 && rec.size() > 3 && rec.compare(rec.size() - 3, 3, ".py") == 0) {
      auto [bytes, size] = reader->getRecord(rec);
      code_bytes += size;
      if (code_bytes > kMaxCodeBytes)
        throw std::runtime_error("the archive holds more than 64 MiB of code");
      check_nesting(static_cast<const char*>(bytes.get()), size, rec);
    }
  }
  auto cu = std::make_shared<CompilationUnit>();
  auto constants = std::make_shared<std::vector<at::IValue>>();
  auto loader = [reader](const std::string& qualifier) -> std::shared_ptr<Source> {
    std::string path = qualifier;
    std::replace(path.begin(), path.end(), '.', '/');
    path = "code/" + path + ".py";
    if (!reader->hasRecord(path)) return nullptr;
    auto [bytes, size] = reader->getRecord(path);
    return std::make_shared<Source>(
        std::string(static_cast<const char*>(bytes.get()), size), path, 1, nullptr);
  };
  SourceImporter importer(cu, constants.get(), loader, reader->version());
  TypeResolver type_resolver = [&](const c10::QualifiedName& qn) {
    if (qn.qualifiedName().rfind(kCustomClassPrefix, 0) == 0)
      r.problems.insert("the archive holds an object of the C++ custom class " + qn.qualifiedName());
    auto t = importer.loadType(qn);  // compiles the class and what it uses
    return c10::StrongTypePtr(cu, std::move(t));
  };
  ObjLoader obj_loader = [&](const at::StrongTypePtr& type, at::IValue input) {
    auto cls = type.type_->expect<c10::ClassType>();
    size_t n = cls->numAttributes();
    auto obj = c10::ivalue::Object::create(type, n);
    // __setstate__ is compiled (and so inspected) but not run
    if (!cls->findMethod("__setstate__") && input.isGenericDict()) {
      auto dict = input.toGenericDict();
      for (size_t i = 0; i < n; ++i) {
        auto it = dict.find(cls->getAttributeName(i));
        if (it != dict.end()) obj->setSlot(i, it->value());
      }
    }
    return obj;
  };
  auto ctuple = readArchiveAndTensors("constants", "", "", type_resolver, obj_loader,
                                      c10::Device(c10::kCPU), *reader);
  for (const auto& c : ctuple.toTupleRef().elements()) constants->push_back(c);
  readArchiveAndTensors("data", "", "", type_resolver, obj_loader, c10::Device(c10::kCPU),
                        *reader);
  return cu;
}

char* copy_out(const std::string& s) {
  char* p = static_cast<char*>(std::malloc(s.size() + 1));
  if (p) std::memcpy(p, s.c_str(), s.size() + 1);
  return p;
}

}  // namespace

extern "C" {

// 0: *out is the report; 1: *out is the error message. *out is malloc'd
// (free it with mlw_torchscript_free); it may be null if allocation failed.
int mlw_torchscript_inspect(const char* data, size_t len, char** out) {
  try {
    Report r;
    // compile each function on its own: with libtorch's default
    // inline-everything mode, a function calling another twice, n levels
    // deep, would be compiled into 2^n nodes before it could be measured
    struct NoInlining {
      bool before = getInlineEverythingMode();
      NoInlining() { getInlineEverythingMode() = false; }
      ~NoInlining() { getInlineEverythingMode() = before; }
    } no_inlining;
    auto cu = compile_only(data, len, r);
    std::unordered_map<const Function*, uint64_t> inlined;
    for (Function* fn : cu->get_functions()) {
      if (!fn) continue;
      std::string name = fn->qualname().qualifiedName();
      if (!fn->isGraphFunction()) {
        r.problems.insert(name + " is not a TorchScript graph function");
        continue;
      }
      walk(toGraphFunction(*fn).graph()->block(), name, r);
      uint64_t size = expanded(fn, inlined, 0);
      r.sizes.push_back(name + "\t" + std::to_string(size));
      if (size > kMaxInlinedNodes)
        r.problems.insert(name + " expands to more than 200,000 graph nodes once its calls are "
                          "inlined (as libtorch does to run it)");
    }
    std::string s;
    for (const auto& o : r.ops) s += "O " + o + "\n";
    for (const auto& p : r.problems) s += "P " + p + "\n";
    for (const auto& z : r.sizes) s += "S " + z + "\n";
    *out = copy_out(s);
    return 0;
  } catch (const c10::Error& e) {
    *out = copy_out(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *out = copy_out(e.what());
  } catch (...) {
    *out = copy_out("unknown error while reading the TorchScript archive");
  }
  return 1;
}

void mlw_torchscript_free(char* p) { std::free(p); }

// Routes libtorch's warnings (TORCH_WARN, and `aten::warn` in a model's
// code) to `sink` instead of writing them raw to stderr. Call once.
void mlw_torch_route_warnings(void (*sink)(const char*, size_t)) {
  struct Handler : c10::WarningHandler {
    void (*sink)(const char*, size_t);
    void process(const c10::Warning& w) override {
      const std::string& m = w.msg();
      sink(m.data(), m.size());
    }
  };
  static Handler handler;
  handler.sink = sink;
  c10::WarningUtils::set_warning_handler(&handler);
}

}  // extern "C"
