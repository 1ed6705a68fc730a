# ruff: noqa: I001, E501  (kept as the API document writes it)
# Example from the API document (MultiStreamAsyncAccl), laid out line by line. Changed only
# where this machine needs it: MobileNet(weights=None), since no weights can be downloaded,
# and the top-5 class indices instead of decode_predictions (which downloads the class names).
# Needs the tf extra: pip install 'memryx[tf]'
import numpy as np
import tensorflow as tf
from memryx import NeuralCompiler, MultiStreamAsyncAccl

class Application:
    # define the callback that will return model input data
    def __init__(self):
        self.streams = []
        self.streams_idx = []
        self.outputs = []
        for i in range(2):
            self.streams.append([np.random.rand(224,224,3).astype(np.float32) for i in range(10)])
            self.streams_idx.append(0)
            self.outputs.append([])

    def data_source(self, stream_idx):
        # generate inputs based on stream_idx
        if self.streams_idx[stream_idx] == len(self.streams[stream_idx]):
            return None
        self.streams_idx[stream_idx]+=1
        return self.streams[stream_idx][self.streams_idx[stream_idx]-1]

    # define the callback that will process the outputs of the model
    def output_processor(self, stream_idx, *outputs):
        logits = np.squeeze(outputs[0], 0)
        preds = (logits, np.argsort(logits)[::-1][:5])
        # route outputs based on stream_idx
        self.outputs[stream_idx].append(preds)

# Compile a MobileNet model for testing.
# Typically, comilation need to be done one time only.
model = tf.keras.applications.MobileNet(weights=None)
nc = NeuralCompiler(models=model,verbose=1)
dfp = nc.run()

# Accelerate using the MemryX hardware
app = Application()
accl = MultiStreamAsyncAccl(dfp)
accl.connect_streams(app.data_source, app.output_processor, 2) # starts asynchronous execution of input output callback pair associated with 2 streams
accl.wait() # wait for the accelerator to finish execution
