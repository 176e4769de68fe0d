"""The detector: the model (:mod:`.model`), where and how it runs (:mod:`.runtime`), batched inference
(:mod:`.infer`), the decision rule and output columns (:mod:`.scores`), and the feature cache of frozen-encoder
training (:mod:`.cache`)."""
